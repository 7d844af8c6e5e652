"""Side-by-side timing shared by the bench scripts: candidates run in turn, so a busy machine slows all alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each candidate (``timer`` clock), after ``warmup`` calls each, repeats interleaved."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = timer()
            run()
            times[name].append(timer() - t0)
    return times
