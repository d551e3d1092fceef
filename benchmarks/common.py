"""What every benchmark script shares: best-of timing and writing its results table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Seconds: the best of ``repeats`` calls after a warm-up. Other jobs on the cores only
    ever add time, so the minimum estimates the idle-machine time the anchors were measured
    on."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_table(name: str, table: str) -> Path:
    """Write ``table`` to ``benchmarks/results/<name>.md`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.md"
    out.write_text(table.rstrip("\n") + "\n")
    print(table)
    return out
