"""Telemetry sources. `PsutilSource` reads the machine; `FixedSource` reports what it is told (tests, simulator,
demos). The hub classifies node health from these figures, so a source is the one place to drive it.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import psutil


class TelemetrySource(Protocol):
    def sample(self) -> dict[str, float]:
        """Metric name (an id) -> number. Called every telemetry interval."""


class PsutilSource:
    """CPU, load, memory, disk, network, temperature (where sensors exist), and the agent's own RSS and CPU."""

    def __init__(self, disk_path: str = "/") -> None:
        self.disk_path = disk_path
        self.process = psutil.Process(os.getpid())
        psutil.cpu_percent(None)  # the first call only primes the counters
        self.process.cpu_percent(None)

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {"cpu": psutil.cpu_percent(None), "mem": psutil.virtual_memory().percent}
        try:
            metrics["disk"] = psutil.disk_usage(self.disk_path).percent
        except OSError:
            pass
        try:
            metrics["load1"], metrics["load5"], metrics["load15"] = os.getloadavg()
        except OSError:
            pass
        net = psutil.net_io_counters()
        if net is not None:
            metrics["net_rx"], metrics["net_tx"] = float(net.bytes_recv), float(net.bytes_sent)
        temperature = self._temperature()
        if temperature is not None:
            metrics["temp"] = temperature
        with self.process.oneshot():
            metrics["rss_mb"] = round(self.process.memory_info().rss / 2**20, 2)
            metrics["agent_cpu"] = self.process.cpu_percent(None)
        return metrics

    @staticmethod
    def _temperature() -> float | None:
        reader = getattr(psutil, "sensors_temperatures", None)
        if reader is None:
            return None
        try:
            readings = [t.current for sensors in reader().values() for t in sensors if t.current is not None]
        except (OSError, RuntimeError):
            return None
        return max(readings) if readings else None


class FixedSource:
    """Reports the metrics it holds; `set()` changes them (e.g. a temperature spike in a test)."""

    def __init__(self, **metrics: float) -> None:
        self.metrics = dict(metrics)
        self.samples = 0

    def set(self, **metrics: float) -> None:
        self.metrics.update(metrics)

    def sample(self) -> dict[str, float]:
        self.samples += 1
        return dict(self.metrics)


class OverlaySource:
    """Another source with some metrics replaced by the JSON map in a file, re-read at every sample.

    This is how tests, demos and the simulator drive what a real agent reports (`telemetry_file` in the agent's
    config): writing {"temp": 85} to the file makes the next samples report 85 C. A missing or unreadable file
    means no overlay; non-numeric values are ignored.
    """

    def __init__(self, base: TelemetrySource, path: str) -> None:
        self.base = base
        self.path = path

    def sample(self) -> dict[str, float]:
        metrics = self.base.sample()
        try:
            with open(self.path) as f:
                overlay = json.load(f)
        except (OSError, ValueError):
            return metrics
        if isinstance(overlay, dict):
            metrics.update({str(k): float(v) for k, v in overlay.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return metrics
