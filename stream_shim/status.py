"""What the shim has done: counts by reason, target states, latencies.

`ShimStatus` is shared by the shim's threads (every method is thread-safe).  It
is written as a JSON status file every second (`StatusWriter`) and can be served
over HTTP (`StatusServer`: ``/status`` JSON, ``/metrics`` in the Prometheus text
format rendered by `prometheus_client` from the status's own registry, ``/healthz``).
"""

from __future__ import annotations

__all__ = ["ShimStatus", "StatusWriter", "StatusServer", "percentile"]

import collections
import http.server
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from workflow.core.redact import redact_text

_log = logging.getLogger(__name__)

_LATENCY_WINDOW = 2000  # keep the latest samples of each latency


def percentile(values: list[float], q: float) -> float | None:
    """Return the ``q``-th percentile (0-100, nearest rank) of ``values``, or `None` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


class ShimStatus:
    """Counters, gauges and latency samples of one shim run.

    Parameters
    ----------
    instrument : `str`
        Instrument the shim serves.
    design : `str`
        Submission design in use.
    """

    def __init__(self, instrument: str, design: str) -> None:
        self.instrument = instrument
        self.design = design
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=_LATENCY_WINDOW)
        )
        self._latency_totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])  # count, sum
        self._gauges: dict[str, Callable[[], Mapping[str, int]]] = {}
        self._conditions: dict[str, tuple[str, str]] = {}
        self.state = "starting"
        # One registry per status (per process): /metrics shows this shim's families only.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def set_condition(self, name: str, level: str | None, detail: str = "") -> None:
        """Raise (``level`` ``"degraded"`` or ``"unhealthy"``) or clear (`None`) a named health condition.

        ``/healthz`` answers 503 while any condition is ``unhealthy``, and names
        every active one; ``degraded`` conditions are reported but stay 200
        (e.g. a consumer being recreated, a target isolated after a crash loop).
        """
        if level not in (None, "degraded", "unhealthy"):
            raise ValueError(f"health condition {name}: level {level!r} is not degraded, unhealthy or None")
        with self._lock:
            if level is None:
                self._conditions.pop(name, None)
            else:
                self._conditions[name] = (level, redact_text(detail))  # details quote exceptions: URLs

    def conditions(self) -> dict[str, dict[str, str]]:
        """Return the active health conditions: name -> level and detail."""
        with self._lock:
            return {name: {"level": level, "detail": detail} for name, (level, detail) in self._conditions.items()}

    def health(self) -> tuple[bool, str]:
        """Return whether the shim is healthy and the ``/healthz`` text (state, then active conditions)."""
        conditions = self.conditions()
        healthy = self.state in ("running", "draining") and all(c["level"] != "unhealthy" for c in conditions.values())
        words = [self.state, *(f"{name}={c['level']}: {c['detail']}" for name, c in sorted(conditions.items()))]
        if self.state in ("running", "draining") and any(c["level"] == "degraded" for c in conditions.values()):
            words[0] = f"{self.state} (degraded)"
        return healthy, "\n".join(words) + "\n"

    def count(self, category: str, reason: str, n: int = 1) -> None:
        """Add ``n`` to the count of ``reason`` in ``category`` (e.g. ``next_visit``, ``stale``)."""
        with self._lock:
            self._counts[category][reason] += n

    def counts(self, category: str) -> dict[str, int]:
        """Return the counts of one category."""
        with self._lock:
            return dict(self._counts.get(category, {}))

    def observe(self, name: str, seconds: float) -> None:
        """Record one latency sample of ``name`` (e.g. ``submit_to_outcome``)."""
        with self._lock:
            self._latencies[name].append(float(seconds))
            totals = self._latency_totals[name]
            totals[0] += 1
            totals[1] += float(seconds)

    def gauge(self, name: str, provider: Callable[[], Mapping[str, int]]) -> None:
        """Register a function giving current values (e.g. targets by state) under ``name``."""
        self._gauges[name] = provider

    def snapshot(self) -> dict[str, Any]:
        """Return everything as a JSON-friendly `dict`."""
        with self._lock:
            counts = {c: dict(sorted(v.items())) for c, v in sorted(self._counts.items())}
            samples = {n: list(v) for n, v in self._latencies.items()}
        latencies = {
            name: {
                "count": len(v),
                "p50_s": _round(percentile(v, 50)),
                "p95_s": _round(percentile(v, 95)),
                "max_s": _round(max(v) if v else None),
            }
            for name, v in sorted(samples.items())
        }
        gauges: dict[str, dict[str, int | str]] = {}  # a failing provider gives {"error": message}
        for name, provider in self._gauges.items():
            try:
                gauges[name] = dict(provider())
            except Exception as exc:  # noqa: BLE001 - a status report must not fail
                gauges[name] = {"error": redact_text(str(exc))}
        return {
            "instrument": self.instrument,
            "design": self.design,
            "state": self.state,
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "uptime_s": round(time.time() - self.started, 3),
            "counts": counts,
            "conditions": self.conditions(),
            "gauges": gauges,
            "latencies": latencies,
        }

    def prometheus(self) -> str:
        """Return the counts, gauges and latencies in the Prometheus text format (`prometheus_client`)."""
        return generate_latest(self._registry).decode()

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (the `prometheus_client` collector protocol).

        ``prompt_snake_shim_latency_seconds`` is a summary: ``_count`` and ``_sum`` over
        every sample since start, quantiles over the latest samples.
        """
        snap = self.snapshot()
        events = CounterMetricFamily(
            "prompt_snake_shim_events",
            "Events handled by the stream shim, by category and reason.",
            labels=["category", "reason"],
        )
        for category, reasons in snap["counts"].items():
            for reason, value in reasons.items():
                events.add_metric([category, reason], value)
        yield events
        gauge = GaugeMetricFamily(
            "prompt_snake_shim_gauge", "Current values (targets by state, ...).", labels=["name", "key"]
        )
        for name, values in snap["gauges"].items():
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    gauge.add_metric([name, key], value)
        yield gauge
        latency = SummaryMetricFamily(
            "prompt_snake_shim_latency_seconds",
            "Latencies; quantiles over the latest samples.",
            labels=["name"],
        )
        with self._lock:
            totals = {name: tuple(pair) for name, pair in self._latency_totals.items()}
        for name, stats in snap["latencies"].items():
            count, total = totals.get(name, (stats["count"], 0.0))
            latency.add_metric([name], count_value=count, sum_value=total)
            for quantile, key in (("0.5", "p50_s"), ("0.95", "p95_s")):
                if stats[key] is not None:
                    latency.add_sample(
                        "prompt_snake_shim_latency_seconds", {"name": name, "quantile": quantile}, stats[key]
                    )
        yield latency
        yield GaugeMetricFamily("prompt_snake_shim_uptime_seconds", "Seconds since the shim started.", snap["uptime_s"])

    def write(self, path: str | Path) -> None:
        """Write the snapshot to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".tmp-status-") as tmp:
            json.dump(self.snapshot(), tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class StatusWriter(threading.Thread):
    """Write the status file every ``interval_s`` until ``stop`` is set, and once more at the end."""

    def __init__(self, status: ShimStatus, path: str | Path, stop: threading.Event, interval_s: float = 1.0) -> None:
        super().__init__(name="status-writer", daemon=True)
        self.status, self.path, self.stop, self.interval_s = status, Path(path), stop, interval_s

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._write()
        self._write()

    def _write(self) -> None:
        try:
            self.status.write(self.path)
        except OSError as exc:
            _log.warning("cannot write status file %s: %s", self.path, exc)


class StatusServer:
    """A tiny HTTP server on ``host:port``: ``/status``, ``/metrics``, ``/healthz``.

    Parameters
    ----------
    status : `ShimStatus`
        What to serve.
    port : `int`
        TCP port (0: any free one; see `port` after `start`).
    host : `str`, optional
        Address to bind.
    """

    def __init__(self, status: ShimStatus, port: int, host: str = "127.0.0.1") -> None:
        shim_status = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.startswith("/metrics"):
                    body, kind = shim_status.prometheus().encode(), CONTENT_TYPE_LATEST
                elif self.path.startswith("/status"):
                    body, kind = json.dumps(shim_status.snapshot(), indent=1).encode(), "application/json"
                elif self.path.startswith("/healthz"):
                    healthy, text = shim_status.health()
                    body, kind = text.encode(), "text/plain"
                    if not healthy:
                        self.send_response(503)
                        self._finish(body, kind)
                        return
                else:
                    self.send_response(404)
                    self._finish(b"not found: try /status, /metrics or /healthz\n", "text/plain")
                    return
                self.send_response(200)
                self._finish(body, kind)

            def _finish(self, body: bytes, kind: str) -> None:
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
                _log.debug("status http: " + format, *args)

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-http", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()
        _log.info("status served on http://127.0.0.1:%d/status (and /metrics, /healthz)", self.port)

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
