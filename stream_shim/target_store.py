"""Where the targets' files live: the run directory, or Snakemake's S3 storage prefix.

With ``profiles/local`` Snakemake's jobs share the shim's file system: visit files
are written into the run directory and ``done.json`` / ``failed.json`` read from
it.  With ``profiles/k8s`` there is no shared file system: every workflow path
lives under the profile's ``default-storage-prefix`` on S3, so visit files must be
put there (the local copy is kept for the journal) and outcomes read from there.
"""

from __future__ import annotations

__all__ = ["TargetStore", "LocalStore", "S3Store", "store_for_profile"]

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from workflow.config import PROJECT_ROOT
from workflow.target import write_json

_log = logging.getLogger(__name__)


class TargetStore(Protocol):
    """File operations on workflow paths (relative to the run directory)."""

    def write_json(self, path: Path, data: Any) -> None: ...  # noqa: D102

    def exists(self, path: Path) -> bool: ...  # noqa: D102

    def read_json(self, path: Path) -> Any: ...  # noqa: D102

    def mtime(self, path: Path) -> float | None: ...  # noqa: D102


class LocalStore:
    """Workflow paths are files under ``root`` (the run directory)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def write_json(self, path: Path, data: Any) -> None:
        """Write atomically (unless the file exists: visit files never change)."""
        if not (self.root / path).exists():
            write_json(self.root / path, data)

    def exists(self, path: Path) -> bool:
        """Return whether the file exists."""
        return (self.root / path).exists()

    def read_json(self, path: Path) -> Any:
        """Read a JSON file."""
        return json.loads((self.root / path).read_text())

    def mtime(self, path: Path) -> float | None:
        """Return the modification time, or `None` if absent."""
        try:
            return (self.root / path).stat().st_mtime
        except FileNotFoundError:
            return None


class S3Store:
    """Workflow paths are objects under ``s3://bucket/prefix/``; writes are also kept under ``root``.

    Parameters
    ----------
    prefix : `str`
        ``s3://bucket/prefix`` (Snakemake's ``default-storage-prefix``).
    endpoint_url : `str` or `None`
        S3 endpoint; credentials come from ``AWS_*`` environment variables.
    root : `pathlib.Path`
        Run directory for the local copies.
    """

    def __init__(self, prefix: str, endpoint_url: str | None, root: Path) -> None:
        import boto3
        import botocore.config

        if not prefix.startswith("s3://"):
            raise ValueError(f"storage prefix {prefix!r}: expected s3://bucket[/prefix]")
        self.bucket, _, key_prefix = prefix[len("s3://"):].partition("/")
        self.key_prefix = key_prefix.strip("/")
        self.root = Path(root)
        self.prefix, self.endpoint_url = prefix, endpoint_url
        self._client = boto3.client("s3", endpoint_url=endpoint_url, config=botocore.config.Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}))

    def _key(self, path: Path) -> str:
        return f"{self.key_prefix}/{Path(path).as_posix()}" if self.key_prefix else Path(path).as_posix()

    def write_json(self, path: Path, data: Any) -> None:
        """Put the object unless it exists (visit files never change), and keep a local copy."""
        write_json(self.root / path, data)
        if self.exists(path):
            return
        self._client.put_object(Bucket=self.bucket, Key=self._key(path),
                                Body=json.dumps(data, indent=1, sort_keys=True).encode())

    def _head(self, path: Path) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._key(path))
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def exists(self, path: Path) -> bool:
        """Return whether the object exists."""
        return self._head(path) is not None

    def read_json(self, path: Path) -> Any:
        """Read a JSON object."""
        return json.loads(self._client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read())

    def mtime(self, path: Path) -> float | None:
        """Return the object's LastModified as unix time, or `None` if absent."""
        head = self._head(path)
        return None if head is None else head["LastModified"].timestamp()


def store_for_profile(profile: str | Path, root: Path, *, storage_prefix: str | None = None,
                      endpoint_url: str | None = None) -> LocalStore | S3Store:
    """Return the store matching a Snakemake profile: S3 if it sets an S3 default storage provider.

    Parameters
    ----------
    profile : `str` or `pathlib.Path`
        Profile directory (relative: to the checkout).
    root : `pathlib.Path`
        Run directory.
    storage_prefix, endpoint_url : `str`, optional
        Override the profile's ``default-storage-prefix`` / ``storage-s3-endpoint-url``.
    """
    path = Path(profile)
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    settings: Mapping[str, Any] = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if settings.get("default-storage-provider") != "s3":
        return LocalStore(root)
    prefix = storage_prefix or settings.get("default-storage-prefix")
    if not prefix:
        raise ValueError(f"profile {path}: default-storage-provider s3 without default-storage-prefix")
    return S3Store(prefix, endpoint_url or settings.get("storage-s3-endpoint-url"), root)
