"""Decode SeaweedFS filer notifications that the filer publishes to Kafka.

SeaweedFS cannot send S3 bucket notifications, but its filer publishes every
metadata change when ``notification.toml`` enables ``[notification.kafka]``.
The Kafka key is the full path (``/buckets/<bucket>/<key>`` for S3 objects);
the value is a protobuf ``filer_pb.EventNotification``::

    message EventNotification {
        Entry old_entry = 1;        // absent for a creation
        Entry new_entry = 2;        // absent for a deletion
        bool delete_chunks = 3;
        string new_parent_path = 4; // directory of new_entry
        bool is_from_other_cluster = 5;
        repeated int32 signatures = 6;
    }
    message Entry { string name = 1; bool is_directory = 2; ...; FuseAttributes attributes = 4; ... }
    message FuseAttributes { uint64 file_size = 1; int64 mtime = 2; ... }

Only those few fields are read, with a small wire-format reader, so no
protobuf dependency is needed.
"""

from __future__ import annotations

__all__ = ["CREATED", "DELETED", "RENAMED", "UPDATED", "FilerEvent", "decode_filer_event", "new_entry_attributes"]

import logging
from collections.abc import Iterator
from typing import NamedTuple

_log = logging.getLogger(__name__)

CREATED = "created"
UPDATED = "updated"
RENAMED = "renamed"
DELETED = "deleted"

_BUCKETS = "/buckets/"
_MULTIPART_STAGING = ".uploads/"  # Parts of unfinished multipart uploads.

# Protobuf wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class FilerEvent(NamedTuple):
    """A change to one S3 object, decoded from a filer notification."""

    bucket: str
    """Bucket name."""
    key: str
    """Object key; for `RENAMED`, the new key."""
    kind: str
    """One of `CREATED`, `UPDATED`, `RENAMED`, `DELETED`."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a base-128 varint at ``pos``; return it and the next position."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("malformed filer notification: truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("malformed filer notification: varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield ``(field number, value)`` of a protobuf message, skipping fixed-width fields.

    Varints are yielded as `int`, length-delimited fields as `bytes`.
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire_type == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError(f"malformed filer notification: field {number} runs past the end")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        else:
            raise ValueError(f"malformed filer notification: unsupported wire type {wire_type}")
    if pos != len(buf):
        raise ValueError("malformed filer notification: fixed-width field runs past the end")


def _entry(buf: bytes) -> tuple[str, bool]:
    """Return ``(name, is_directory)`` of a ``filer_pb.Entry``."""
    name, is_dir = "", False
    for number, value in _fields(buf):
        if number == 1 and isinstance(value, bytes):
            name = value.decode("utf-8")
        elif number == 2 and isinstance(value, int):
            is_dir = bool(value)
    return name, is_dir


def _split(path: str) -> tuple[str, str] | None:
    """Split ``/buckets/<bucket>/<key>`` or return `None` for other paths."""
    if not path.startswith(_BUCKETS):
        return None
    bucket, _, key = path[len(_BUCKETS) :].partition("/")
    if not bucket or bucket.startswith(".") or not key or key.startswith(_MULTIPART_STAGING):
        return None  # Not an object, an internal bucket (.system), or a staged part.
    return bucket, key


def decode_filer_event(key: bytes | str | None, value: bytes) -> FilerEvent | None:
    """Decode one Kafka message from the SeaweedFS filer.

    Parameters
    ----------
    key : `bytes`, `str` or `None`
        The message key: the full filer path of the changed entry (for a
        rename, its old path).
    value : `bytes`
        The message value, a serialized ``filer_pb.EventNotification``.

    Returns
    -------
    event : `FilerEvent` or `None`
        ``(bucket, key, kind)`` for a change to an S3 object; `None` for
        directories, paths outside ``/buckets/``, internal buckets such as
        ``.system`` and parts of unfinished multipart uploads.  A creation is
        a notification with ``new_entry`` and without ``old_entry``.

    Raises
    ------
    ValueError
        Raised if ``value`` is not a well-formed protobuf message or a name
        is not UTF-8.
    """
    old: bytes | None = None
    new: bytes | None = None
    new_parent = ""
    for number, field in _fields(value):
        if isinstance(field, bytes):
            if number == 1:
                old = field
            elif number == 2:
                new = field
            elif number == 4:
                new_parent = field.decode("utf-8")
    old_path = key.decode("utf-8") if isinstance(key, bytes) else key
    if new is not None:
        name, is_dir = _entry(new)
        new_path = f"{new_parent.rstrip('/')}/{name}" if new_parent and name else old_path
        if old is None:
            kind = CREATED
        else:
            kind = UPDATED if old_path is None or new_path == old_path else RENAMED
        path = new_path
    elif old is not None:
        _, is_dir = _entry(old)
        kind, path = DELETED, old_path
    else:
        return None
    if is_dir or path is None:
        return None
    parts = _split(path)
    if parts is None:
        return None
    return FilerEvent(parts[0], parts[1], kind)


def new_entry_attributes(value: bytes) -> tuple[int | None, int | None]:
    """Return ``(file_size, mtime)`` of the new entry of a filer notification.

    Parameters
    ----------
    value : `bytes`
        The message value, a serialized ``filer_pb.EventNotification``.

    Returns
    -------
    attributes : `tuple` [`int` or `None`, `int` or `None`]
        Size in bytes and modification time (unix seconds) of ``new_entry``;
        `None` for what the message does not hold.

    Raises
    ------
    ValueError
        Raised if ``value`` is not a well-formed protobuf message.
    """
    size: int | None = None
    mtime: int | None = None
    for number, field in _fields(value):
        if number != 2 or not isinstance(field, bytes):
            continue
        for entry_number, entry_field in _fields(field):
            if entry_number != 4 or not isinstance(entry_field, bytes):
                continue
            for attr_number, attr in _fields(entry_field):
                if attr_number == 1 and isinstance(attr, int):
                    size = attr
                elif attr_number == 2 and isinstance(attr, int):
                    mtime = attr
    return size, mtime
