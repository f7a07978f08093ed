"""Tests for `workflow.stages.node_cache`: fetch once, bounded size, safe under concurrency."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from workflow.stages.node_cache import NodeCache


def _writer(content: bytes, calls: list | None = None):
    def fetch(path: Path) -> None:
        if calls is not None:
            calls.append(path)
        path.write_bytes(content)

    return fetch


def test_second_get_is_a_hit(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=10_000)
    calls: list = []
    first = cache.get("abc", _writer(b"x" * 10, calls), suffix=".fits")
    second = cache.get("abc", _writer(b"y" * 10, calls), suffix=".fits")
    assert first == second and first.read_bytes() == b"x" * 10
    assert len(calls) == 1
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_eviction_keeps_size_bound_and_linked_copies(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=250)
    linked = cache.link_into("k0", _writer(b"0" * 100), tmp_path / "work" / "k0.bin")
    for i in range(1, 5):
        time.sleep(0.01)  # distinct mtimes for LRU order
        cache.get(f"k{i}", _writer(bytes([48 + i]) * 100))
    assert cache.size() <= 250
    assert not cache._entry("k0", "").exists()  # oldest evicted
    assert cache._entry("k4", "").exists()  # newest kept
    assert linked.read_bytes() == b"0" * 100  # the target's link survives eviction
    assert cache.stats.evicted >= 2


def _slow_fetch_worker(root: str, out: str) -> None:
    def fetch(path: Path) -> None:
        with open(out, "a") as log:
            log.write("fetch\n")
        time.sleep(0.3)
        path.write_bytes(b"payload")

    cache = NodeCache(root, max_bytes=10_000)
    assert cache.get("shared", fetch).read_bytes() == b"payload"


def test_concurrent_targets_fetch_once(tmp_path):
    root, out = str(tmp_path / "cache"), str(tmp_path / "fetches.log")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_slow_fetch_worker, args=(root, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert Path(out).read_text().count("fetch") == 1
