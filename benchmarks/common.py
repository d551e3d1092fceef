"""What every benchmark script shares: the timer, the results writer, the stamp line, and the
side-by-side neural-tangents runner.

Timing statistic (both sides, every table): ``k`` timed calls after one untimed warm-up call,
reported as the median and the best. On cores other jobs share, the best estimates the idle
time (others only ever add time) and the median is the typical call; a large gap between the
two says the run was noisy.

neural-tangents runs in its own virtual environment (it needs jax 0.4.25 and numpy < 2, which
the ntkit environment does not have), as a subprocess of that environment's python running
``benchmarks/_nt_driver.py`` on inputs this process writes to ``.npy`` files, so both sides see
bit-identical inputs. The interpreter is ``$NTKIT_NT_PYTHON`` if set, else
``<repo>/../nt-venv/bin/python``; when neither exists the neural-tangents columns are skipped
with a note.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
DRIVER = HERE / "_nt_driver.py"


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Seconds of ``repeats`` timed calls: ``median`` and ``best`` (minimum)."""

    median: float
    best: float
    times: tuple[float, ...]

    def ms(self) -> str:
        """``"median / best"`` in milliseconds, for a table cell."""
        return f"{fmt_ms(self.median)} / {fmt_ms(self.best)}"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def timing(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (torch is synchronous
    on the CPU, so returning is finishing)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), tuple(times))


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Seconds: the best of ``repeats`` calls after a warm-up (for machine ceilings only)."""
    return timing(fn, repeats).best


def ratio(a: Timing, b: Timing) -> str:
    """``a / b`` by median and by best, for a table cell."""
    return f"{a.median / b.median:.2f}x / {a.best / b.best:.2f}x"


# --------------------------------------------------------------------------- threads
def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads in torch. The neural-tangents side gets the same
    number through its CPU affinity (see ``_nt_driver.py``)."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for subprocesses


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# --------------------------------------------------------------------------- stamp
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def stamp(threads: int, nt: "NT | None" = None, shared: bool = False) -> str:
    """One line naming what produced a table: commit (+dirty when the benchmark scripts or
    the library differ from it), date, versions, threads, CPU, load."""
    import torch

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "benchmarks/*.py", "src/"):
        commit += "+dirty"
    jax = nt.versions if nt is not None and nt.available else "neural-tangents not run"
    line = (f"Stamp: commit {commit}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"torch {torch.__version__}, {jax}, {threads} thread(s) on both sides, "
            f"{cpu_model()} ({os.cpu_count()} cores), load average at start "
            f"{os.getloadavg()[0]:.1f}.")
    if shared:
        line += (" The machine was shared with other jobs during this run: absolute times "
                 "are noisy; compare within a row.")
    return line


def write_table(name: str, table: str) -> Path:
    """Write ``table`` to ``benchmarks/results/<name>.md`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.md"
    out.write_text(table.rstrip("\n") + "\n")
    print(table)
    return out


# --------------------------------------------------------------------------- neural-tangents
def nt_python() -> Path | None:
    """The neural-tangents interpreter, or None when there is none."""
    env = os.environ.get("NTKIT_NT_PYTHON")
    candidate = Path(env) if env else REPO.parent / "nt-venv" / "bin" / "python"
    return candidate if candidate.exists() else None


class NT:
    """Runs jobs in ``_nt_driver.py`` under the neural-tangents interpreter.

    ``run(jobs, arrays)`` writes ``arrays`` (name -> numpy array) to a temporary directory,
    runs the driver on ``jobs`` (a list of dicts; see the driver) and returns its results: per
    job a dict with ``median``/``best``/``times`` (seconds), ``first`` (the first call,
    including jit compilation), ``cpu_median``, and ``out`` (a numpy array: the part of the
    output the job asked to return for the numerical cross-check).
    """

    def __init__(self, threads: int, timeout: float = 900.0):
        self.python = nt_python()
        self.threads = threads
        self.timeout = timeout
        self.versions = ""
        self.note = ""
        if self.python is None:
            self.note = ("neural-tangents columns skipped: no interpreter at $NTKIT_NT_PYTHON "
                         "or ../nt-venv/bin/python (see benchmarks/README.md).")
            return
        try:
            res = subprocess.run([str(self.python), str(DRIVER), "--versions"],
                                 capture_output=True, text=True, timeout=120, check=True)
            self.versions = res.stdout.strip().splitlines()[-1]
        except (OSError, subprocess.SubprocessError) as exc:
            self.note = f"neural-tangents columns skipped: {self.python} failed ({exc})."
            self.python = None

    @property
    def available(self) -> bool:
        return self.python is not None

    def run(self, jobs: list[dict], arrays: dict[str, np.ndarray], x64: bool) -> list[dict]:
        if not self.available:
            raise RuntimeError(self.note)
        with tempfile.TemporaryDirectory(prefix="ntkit-nt-") as tmp:
            tmp_path = Path(tmp)
            for name, arr in arrays.items():
                np.save(tmp_path / f"{name}.npy", np.ascontiguousarray(arr))
            (tmp_path / "jobs.json").write_text(json.dumps(
                {"jobs": jobs, "x64": x64, "threads": self.threads}))
            proc = subprocess.run([str(self.python), str(DRIVER), str(tmp_path)],
                                  capture_output=True, text=True, timeout=self.timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"neural-tangents driver failed:\n{proc.stderr[-3000:]}")
            results = json.loads((tmp_path / "results.json").read_text())
            for i, res in enumerate(results):
                out = tmp_path / f"out{i}.npy"
                res["out"] = np.load(out) if out.exists() else None
        return results


def nt_timing(res: dict) -> Timing:
    return Timing(res["median"], res["best"], tuple(res["times"]))


def max_rel_diff(ours, theirs) -> float:
    """max |a - b| / max |b| over the compared entries."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def add_common_args(parser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="intra-op threads for torch and for neural-tangents "
                        "(default: every core this process may use)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell")
    parser.add_argument("--shared", action="store_true",
                        help="note in the table that other jobs shared the machine")


if __name__ == "__main__":  # pragma: no cover
    print(stamp(default_threads(), NT(default_threads())), file=sys.stdout)
