"""Where the node's stage server listens, and who may be on the other end.

The socket lives in a directory only its user can enter: ``$XDG_RUNTIME_DIR/prompt-snake``
when ``XDG_RUNTIME_DIR`` is a directory of this user that nobody else may write,
else ``/tmp/prompt-snake-<uid>``.  The directory is created mode 0700; an existing
one that is a symlink, belongs to another user or lets group or others in is
refused (`UnsafeSocketError`), never used or "fixed": in a shared ``/tmp``,
another user could have made it first to catch the stage requests (which carry
the job's environment, credentials included) or to answer them with a fake exit
code.  Both ends also check the peer's credentials on the connected socket
(``SO_PEERCRED``): the client talks only to a server of its own uid and the server
serves only clients of its own uid.

Standard library only, and cheap (one ``lstat``, one ``getsockopt``): the stage
client imports it for every job.
"""

from __future__ import annotations

__all__ = ["UnsafeSocketError", "check_peer", "peer_uid", "private_dir", "runtime_dir"]

import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

SHARED_TMP = "/tmp"
"""Where the per-user directory goes when there is no usable ``XDG_RUNTIME_DIR``."""

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class UnsafeSocketError(PermissionError):
    """The stage server's directory or peer is not this user's own; nothing was sent."""


def _is_private(info: os.stat_result, uid: int) -> bool:
    return stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o077


def private_dir(path: str | Path) -> Path:
    """Return ``path``, created mode 0700 if missing, after checking it is this user's alone.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The directory (its parent must exist).

    Returns
    -------
    path : `pathlib.Path`
        The same directory.

    Raises
    ------
    UnsafeSocketError
        If it is a symlink or not a directory, belongs to another user, or is open
        to group or others.
    """
    path = Path(path)
    uid = os.getuid()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not _is_private(info, uid):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else f"mode {stat.S_IMODE(info.st_mode):04o}"
        raise UnsafeSocketError(
            f"stage server directory {path} is not private to uid {uid} "
            f"(owner uid {info.st_uid}, {kind}); remove it or set XDG_RUNTIME_DIR to a private directory"
        )
    return path


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Return this user's private directory for stage server sockets (created if missing).

    Parameters
    ----------
    environ : `~collections.abc.Mapping`, optional
        Where ``XDG_RUNTIME_DIR`` is read (default: the process environment).

    Returns
    -------
    path : `pathlib.Path`
        ``$XDG_RUNTIME_DIR/prompt-snake`` or ``/tmp/prompt-snake-<uid>``.

    Raises
    ------
    UnsafeSocketError
        As `private_dir`.
    """
    uid = os.getuid()
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        try:
            info = os.stat(xdg)
        except OSError:
            info = None
        # e.g. sudo keeps the invoking user's XDG_RUNTIME_DIR: not ours, so not used
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o022:
            return private_dir(Path(xdg) / "prompt-snake")
    return private_dir(Path(SHARED_TMP) / f"prompt-snake-{uid}")


def peer_uid(sock: socket.socket) -> int:
    """Return the uid of the process at the other end of a connected UNIX socket (``SO_PEERCRED``)."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def check_peer(sock: socket.socket, what: str) -> None:
    """Raise unless the peer of ``sock`` runs as this process's uid.

    Parameters
    ----------
    sock : `socket.socket`
        A connected UNIX stream socket.
    what : `str`
        What the peer should be (``"stage server"``, ``"stage client"``), for the message.

    Raises
    ------
    UnsafeSocketError
        If the peer's uid differs.
    """
    uid = peer_uid(sock)
    if uid != os.getuid():
        raise UnsafeSocketError(f"{what} runs as uid {uid}, not {os.getuid()}: refused, nothing sent")
