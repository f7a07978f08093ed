"""Where the targets' files live: the run directory, or Snakemake's S3 storage prefix.

With ``profiles/local`` Snakemake's jobs share the shim's file system: visit files
are written into the run directory and ``done.json`` / ``failed.json`` read from
it.  With ``profiles/k8s`` there is no shared file system: every workflow path
lives under the profile's ``default-storage-prefix`` on S3, so visit files must be
put there (the local copy is kept for the journal) and outcomes read from there.

Every path is checked to stay inside the run directory (`contained_path`) before
it is read or written: a path that would leave it raises `PathOutsideRunDirError`
naming the path, and nothing is written.
"""

from __future__ import annotations

__all__ = ["TargetStore", "LocalStore", "S3Store", "store_for_profile", "PathOutsideRunDirError", "contained_path"]

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from workflow.core.config import PROJECT_ROOT
from workflow.core.exceptions import NonRetriableError
from workflow.core.log_fields import shorten
from workflow.stages.target import write_json

_log = logging.getLogger(__name__)


class PathOutsideRunDirError(NonRetriableError, ValueError):
    """A workflow path would leave the run directory (``..``, an absolute path, a NUL byte)."""


def contained_path(root: str | Path, path: str | Path) -> Path:
    """Return ``root / path`` normalized, after checking that it stays inside ``root``.

    The check is lexical (``..`` and absolute paths are resolved by name, not
    through symlinks), so a run directory may link e.g. its ``visits/`` elsewhere.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        The run directory.
    path : `str` or `pathlib.Path`
        A workflow path, relative to ``root`` (or absolute, inside it).

    Returns
    -------
    full : `pathlib.Path`
        The absolute, normalized path.

    Raises
    ------
    PathOutsideRunDirError
        Raised if the path leaves ``root`` or holds a NUL byte; the message names both.
    """
    text = os.fspath(path)
    base = os.path.normpath(os.path.abspath(root))
    if "\x00" in text:
        raise PathOutsideRunDirError(f"path {shorten(text)} holds a NUL byte; not used (run directory {base})")
    full = os.path.normpath(os.path.join(base, text))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise PathOutsideRunDirError(
            f"path {shorten(text)} resolves to {shorten(full)}, outside the run directory {base}; not used"
        )
    return Path(full)


class TargetStore(Protocol):
    """File operations on workflow paths (relative to the run directory)."""

    def write_json(self, path: Path, data: Any) -> None: ...  # noqa: D102

    def exists(self, path: Path) -> bool: ...  # noqa: D102

    def read_json(self, path: Path) -> Any: ...  # noqa: D102

    def mtime(self, path: Path) -> float | None: ...  # noqa: D102

    def remove(self, path: Path) -> None: ...  # noqa: D102


class LocalStore:
    """Workflow paths are files under ``root`` (the run directory)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def write_json(self, path: Path, data: Any) -> None:
        """Write atomically (unless the file exists: visit files never change).

        Raises
        ------
        PathOutsideRunDirError
            Raised, and nothing written, if ``path`` leaves the run directory.
        """
        full = contained_path(self.root, path)
        if not full.exists():
            write_json(full, data)

    def exists(self, path: Path) -> bool:
        """Return whether the file exists (`PathOutsideRunDirError` if ``path`` leaves the run directory)."""
        return contained_path(self.root, path).exists()

    def read_json(self, path: Path) -> Any:
        """Read a JSON file (`PathOutsideRunDirError` if ``path`` leaves the run directory)."""
        return json.loads(contained_path(self.root, path).read_text())

    def mtime(self, path: Path) -> float | None:
        """Return the modification time, or `None` if absent."""
        try:
            return contained_path(self.root, path).stat().st_mtime
        except FileNotFoundError:
            return None

    def remove(self, path: Path) -> None:
        """Delete the file if it exists (a stale ``failed.json`` before a retry)."""
        contained_path(self.root, path).unlink(missing_ok=True)


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
        self.bucket, _, key_prefix = prefix[len("s3://") :].partition("/")
        self.key_prefix = key_prefix.strip("/")
        self.root = Path(root)
        self.prefix, self.endpoint_url = prefix, endpoint_url
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}),
        )

    def _key(self, path: Path) -> str:
        relative = contained_path(self.root, path).relative_to(os.path.normpath(os.path.abspath(self.root)))
        return f"{self.key_prefix}/{relative.as_posix()}" if self.key_prefix else relative.as_posix()

    def write_json(self, path: Path, data: Any) -> None:
        """Put the object unless it exists (visit files never change), and keep a local copy.

        Raises
        ------
        PathOutsideRunDirError
            Raised, and nothing written, if ``path`` leaves the run directory.
        """
        write_json(contained_path(self.root, path), data)
        if self.exists(path):
            return
        self._client.put_object(
            Bucket=self.bucket, Key=self._key(path), Body=json.dumps(data, indent=1, sort_keys=True).encode()
        )

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

    def remove(self, path: Path) -> None:
        """Delete the object if it exists (a stale ``failed.json`` before a retry)."""
        self._client.delete_object(Bucket=self.bucket, Key=self._key(path))


def store_for_profile(
    profile: str | Path, root: Path, *, storage_prefix: str | None = None, endpoint_url: str | None = None
) -> LocalStore | S3Store:
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
