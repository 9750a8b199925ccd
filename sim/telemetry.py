"""Simulated telemetry: a device's CPU follows its baseline, noise and running steps; its temperature follows a
first-order thermal model towards ambient + heat x CPU. Faults pin metrics (a spike, an overheating node)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .profiles import DeviceProfile


@dataclass
class SimTelemetry:
    profile: DeviceProfile
    rng: random.Random
    busy: int = 0                                   # steps running now (set by the device)
    overrides: dict[str, float] = field(default_factory=dict)
    temp: float = 0.0
    humidity: float = 45.0

    def __post_init__(self) -> None:
        self.temp = self.profile.sim.ambient_c

    def sample(self) -> dict[str, float]:
        sim = self.profile.sim
        load = min(100.0, sim.baseline_cpu + 60.0 * self.busy / self.profile.max_concurrent)
        cpu = max(0.0, min(100.0, load + self.rng.uniform(-sim.noise, sim.noise)))
        target = sim.ambient_c + sim.heat_per_cpu * cpu
        self.temp += (target - self.temp) * sim.cooling
        self.humidity = max(5.0, min(95.0, self.humidity + self.rng.uniform(-1.5, 1.5)))
        metrics = {"cpu": round(cpu, 1), "mem": round(30 + 10 * self.busy / self.profile.max_concurrent
                                                      + self.rng.uniform(0, 3), 1),
                   "disk": 40.0, "temp": round(self.temp, 1), "humidity": round(self.humidity, 1)}
        metrics.update(self.overrides)
        if "temp" in self.overrides:
            self.temp = self.overrides["temp"]
        return metrics
