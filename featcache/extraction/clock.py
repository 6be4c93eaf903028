"""The extraction's clock: the wall time of every phase, from the process's start to the
finished store, so that a slow phase cannot hide outside the clock.

Phases are consecutive: each mark closes the phase that ran since the previous mark, so the
phases add up to the total by construction, and the total is measured from the moment the
process started (Linux: /proc), not from when featcache was imported.
"""

from __future__ import annotations

import os
import time

# The phases of an extraction, in order, with what each covers.
PHASES = {
    "startup": "interpreter and imports, up to the extraction's start (CLI runs only)",
    "dataset": "dataset listing, subsets and identity digests",
    "model": "model build and weights, the fingerprint and the temporary store",
    "device": "device initialisation, model on the device, compilation and warm-up",
    "run": "first batch submitted to the last shard committed",
    "assembly": "publishing the store",
}


def process_age() -> float | None:
    """Seconds since this process started, where /proc tells it (Linux; to 10 ms), else
    None: the system's uptime less the process's start time after boot."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class PhaseClock:
    """Consecutive phases: ``mark(name)`` ends the phase that ran since the last mark.

    ``since_process_start()`` opens with the ``startup`` phase (the process's start until
    now); a plain ``PhaseClock()`` (the Python API, called from a long-lived notebook)
    starts at its creation.
    """

    def __init__(self, startup: float | None = None):
        self.phases: dict[str, float] = {} if startup is None else {"startup": startup}
        self._last = time.perf_counter()
        self._start = self._last - (startup or 0.0)

    @classmethod
    def since_process_start(cls) -> PhaseClock:
        return cls(process_age())

    def mark(self, phase: str) -> float:
        """End ``phase`` now (time since the last mark is added to it); returns its seconds."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now
        return self.phases[phase]

    @property
    def total(self) -> float:
        """Seconds from the clock's start (the process's, where known) to the last mark."""
        return self._last - self._start

    def to_dict(self) -> dict[str, float]:
        """Every phase's seconds in order, and ``total``."""
        ordered = {p: round(self.phases[p], 4) for p in PHASES if p in self.phases}
        return {**ordered, "total": round(self.total, 4)}

    def table(self) -> str:
        """The phases as aligned lines, for ``extract -v``."""
        d = self.to_dict()
        total = d["total"] or 1.0
        return "\n".join(
            f"{name:9s} {seconds:8.3f} s {100 * seconds / total:5.1f}%  {PHASES.get(name, '')}"
            for name, seconds in d.items()
        )
