"""Object storage for raws: an S3 bucket, or a plain directory in the embedded default.

Both kinds offer the same few calls, so the camera testers, ingest and the shim do
not care whether a real S3 server is configured (``storage.endpoint_url``) or the
bucket is a directory under ``storage.local_root``.
"""

from __future__ import annotations

__all__ = ["Bucket", "LocalBucket", "S3Bucket", "open_bucket", "BucketUnavailableError"]

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from workflow.core.exceptions import RetriableError

_log = logging.getLogger(__name__)


class BucketUnavailableError(RetriableError, ConnectionError):
    """The object store could not be reached or the bucket does not exist."""


class Bucket(Protocol):
    """The calls every bucket kind supports."""

    name: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def read_head(self, key: str, nbytes: int) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def download(self, key: str, path: Path) -> Path: ...


class LocalBucket:
    """A bucket that is a directory: keys are relative paths under it.

    Writes go to a temporary file renamed into place, so a reader never sees a
    half-written raw (the same guarantee an S3 PUT gives).
    """

    def __init__(self, root: str | Path, name: str) -> None:
        self.name = name
        self.root = Path(root) / name
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"bucket {self.name}: key {key!r} escapes the bucket")
        return path

    def put(self, key: str, data: bytes) -> None:
        """Write an object atomically."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def get(self, key: str) -> bytes:
        """Read an object; `FileNotFoundError` names bucket and key if absent."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"bucket {self.name}: no object {key!r}") from exc

    def read_head(self, key: str, nbytes: int) -> bytes:
        """Read the first ``nbytes`` of an object (e.g. a FITS primary header)."""
        try:
            with open(self._path(key), "rb") as stream:
                return stream.read(nbytes)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"bucket {self.name}: no object {key!r}") from exc

    def exists(self, key: str) -> bool:
        """Return whether an object exists."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix``."""
        keys = (
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return sorted(k for k in keys if k.startswith(prefix))

    def download(self, key: str, path: Path) -> Path:
        """Copy an object to a local file and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.get(key))
        return path


class S3Bucket:
    """A bucket on an S3 server, through boto3."""

    def __init__(self, client: Any, name: str) -> None:
        self.name = name
        self._client = client

    def put(self, key: str, data: bytes) -> None:
        """Write an object."""
        self._client.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        """Read an object; `FileNotFoundError` names bucket and key if absent."""
        try:
            return self._client.get_object(Bucket=self.name, Key=key)["Body"].read()
        except self._client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"bucket {self.name}: no object {key!r}") from exc

    def read_head(self, key: str, nbytes: int) -> bytes:
        """Read the first ``nbytes`` of an object with a ranged GET."""
        try:
            response = self._client.get_object(Bucket=self.name, Key=key, Range=f"bytes=0-{nbytes - 1}")
        except self._client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"bucket {self.name}: no object {key!r}") from exc
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        """Return whether an object exists."""
        try:
            self._client.head_object(Bucket=self.name, Key=key)
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys that start with ``prefix``."""
        paginator = self._client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def download(self, key: str, path: Path) -> Path:
        """Copy an object to a local file and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.get(key))
        return path


def open_bucket(config: Mapping[str, Any], name: str, *, create: bool = False) -> LocalBucket | S3Bucket:
    """Open a bucket as the configuration says: S3 if an endpoint is set, else local.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (its ``storage`` section is used).
    name : `str`
        Bucket name.
    create : `bool`, optional
        Create the bucket if it does not exist (testers, demos).

    Returns
    -------
    bucket : `LocalBucket` or `S3Bucket`

    Raises
    ------
    BucketUnavailableError
        If the S3 server cannot be reached or the bucket is missing.
    """
    storage = config["storage"]
    if not storage.get("endpoint_url"):
        return LocalBucket(storage["local_root"], name)
    import boto3
    import botocore.config
    import botocore.exceptions

    # Credentials come from the environment at call time (AWS_* variables).
    client = boto3.client(
        "s3",
        endpoint_url=storage["endpoint_url"],
        config=botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}),
    )
    try:
        if create:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if name not in existing:
                client.create_bucket(Bucket=name)
        else:
            client.head_bucket(Bucket=name)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise BucketUnavailableError(
            f"S3 bucket {name!r} at {storage['endpoint_url']} is not available: {exc}"
        ) from exc
    return S3Bucket(client, name)
