"""A bounded, node-local file cache shared by concurrent targets.

Prep stages calibs, templates and refcat shards from the central repo.  The next
detector-visit of the same field on this node needs the same files, so they are kept
here, keyed by the Butler dataset id (a UUID: the same id always means the same
bytes).  Targets hard-link entries into their own work area, so evicting an entry
never pulls a file from under a running target.

Concurrency: a per-key lock file serialises the fetch of one entry (two targets
asking for the same missing file fetch it once), entries appear by atomic rename,
and eviction runs under one cache-wide lock.
"""

from __future__ import annotations

__all__ = ["NodeCache", "CacheStats"]

import dataclasses
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class CacheStats:
    """What one `NodeCache` instance did: hits, misses, evicted entries."""

    hits: int = 0
    misses: int = 0
    evicted: int = 0


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class NodeCache:
    """Files cached on this node, at most ``max_bytes`` in all.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Cache directory (``paths.cache`` in the config).
    max_bytes : `int`
        Size bound; least-recently-used entries are evicted beyond it.
    """

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)

    def _entry(self, key: str, suffix: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.root / "entries" / f"{safe}{suffix}"

    def get(self, key: str, fetch: Callable[[Path], None], *, suffix: str = "") -> Path:
        """Return the cached file for ``key``, fetching it once if missing.

        Parameters
        ----------
        key : `str`
            Identity of the content (e.g. a dataset UUID).
        fetch : callable
            ``fetch(path)`` writes the content to ``path``; called only on a miss.
        suffix : `str`, optional
            File name suffix (e.g. ``.fits``) so readers recognise the format.

        Returns
        -------
        path : `pathlib.Path`
            The cache entry.  Link or copy it before relying on it for long:
            eviction may remove the entry later.
        """
        entry = self._entry(key, suffix)
        if entry.exists():
            self.stats.hits += 1
            os.utime(entry)  # recency for LRU eviction
            return entry
        with _locked(self.root / "locks" / f"{entry.name}.lock"):
            if entry.exists():  # another target fetched it while we waited
                self.stats.hits += 1
                return entry
            with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                partial = Path(tmp) / entry.name
                fetch(partial)
                os.replace(partial, entry)
            self.stats.misses += 1
            _log.debug("cached %s (%d bytes)", entry.name, entry.stat().st_size)
        self.evict()
        return entry

    def link_into(self, key: str, fetch: Callable[[Path], None], dest: Path, *, suffix: str = "") -> Path:
        """Fetch through the cache and hard-link the entry to ``dest``.

        Falls back to a copy when ``dest`` is on another filesystem.
        """
        entry = self.get(key, fetch, suffix=suffix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.unlink()
        try:
            os.link(entry, dest)
        except OSError:
            import shutil

            shutil.copyfile(entry, dest)
        return dest

    def size(self) -> int:
        """Return the bytes held by the cache entries."""
        return sum(p.stat().st_size for p in (self.root / "entries").iterdir() if p.is_file())

    def evict(self) -> int:
        """Remove least-recently-used entries until the cache fits its bound.

        Returns
        -------
        evicted : `int`
            Number of entries removed.
        """
        removed = 0
        with _locked(self.root / "evict.lock"):
            entries = []
            for path in (self.root / "entries").iterdir():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
                removed += 1
        if removed:
            self.stats.evicted += removed
            _log.info("node cache %s: evicted %d entries", self.root, removed)
        return removed
