"""Process-wide settings that must be made before torch loads: how OpenMP threads wait for each other.

torch's CPU kernels split work over OpenMP threads, and between parallel regions an idle thread either spins (keeps
its core busy, ready at once) or sleeps (gives the core away, wakes a few microseconds later). GNU OpenMP's default
spins for a long time (300,000 iterations per wait), which is fastest on an idle machine and disastrous on a busy
one: a thread that spins while the thread it waits for has been descheduled burns the very core that thread needs.
Measured on 2 cores (docs/benchmarks.md, benchmarks/contention.py): training ran ~18x slower beside other work.
Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) holds up better under load but costs a third of the speed on an idle
machine.

No single setting is best on both (benchmarks/contention.py, 2-core AMD EPYC, bf16, docs/benchmarks.md): on a quiet
machine OpenMP's default was the fastest (training 302 tokens/s, decode 22.6; a spin bounded to 10,000 iterations
194 and 16.4, PASSIVE 199 and 12.3), and beside one CPU-bound process per core it kept 20% of that (60 and 5.0)
where PASSIVE kept 109 and 11.5. softprompt therefore chooses at start-up: when other work is running
(`machine_is_busy`: the tasks runnable right now, besides this one, fill at least half the cores) it sets
`OMP_WAIT_POLICY=PASSIVE`; on a quiet machine it leaves OpenMP's default. The choice changes timing only, never
results. It is made only when torch is not imported yet (OpenMP reads the variable once, when it starts) and only
when the user has set none of the wait variables: `OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` or `KMP_BLOCKTIME` in the
environment always win, and `SOFTPROMPT_OMP_WAIT=keep` leaves OpenMP's default in place whatever the load.

One thread's team at a time (`release_openmp_threads`). GNU OpenMP gives every thread that starts a parallel
region its own team of worker threads, kept for later, and while it manages more threads than there are cores it
spins only 100 iterations before sleeping (instead of 300,000), whatever the wait policy. A server loads the model
on one thread and runs it on its scheduler's worker thread: two teams, so on 2 cores every one of the worker's
products paid the wake-up of a sleeping thread (prompt scoring ran ~30% slower than the same work on the main
thread, docs/benchmarks.md). The thread that hands the model to a worker therefore gives its team back.

This module imports nothing from softprompt and nothing heavy: `softprompt/__init__.py` calls it first.
"""

from __future__ import annotations

import ctypes
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable, MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OPT_OUT = "SOFTPROMPT_OMP_WAIT"  # "keep": leave OpenMP's default waits alone
BUSY_SHARE = 0.5  # other runnable tasks per core from which the machine counts as busy


def runnable_tasks() -> int | None:
    """Tasks runnable on this machine right now, this one included (Linux /proc/stat); None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def machine_is_busy(
    sample: Callable[[], int | None] = runnable_tasks, samples: int = 5, interval: float = 0.004
) -> bool:
    """Whether other work occupies at least half the cores: the median of a few samples (~20 ms) of the tasks
    runnable right now, less this process. An instant count, not the load average, which still remembers work that
    has just ended (a previous run)."""
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        count = sample()
        if count is None:
            return False
        counts.append(count)
    others = statistics.median(counts) - 1
    return others >= BUSY_SHARE * (os.cpu_count() or 1)


def configure_openmp_waits(
    environ: MutableMapping[str, str] | None = None,
    modules: dict | None = None,
    busy: Callable[[], bool] = machine_is_busy,
) -> str:
    """Choose OpenMP's waits before torch loads, unless the user chose them. Returns what was done: 'default' (a
    quiet machine: OpenMP's own waits), 'passive' (other work is running: OMP_WAIT_POLICY=PASSIVE), 'user' (a wait
    variable was already set, or the opt-out), or 'late' (torch was already imported, so a setting could no longer
    take effect)."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if environ.get(OPT_OUT, "").strip().lower() == "keep" or any(v in environ for v in WAIT_VARIABLES):
        return "user"
    if "torch" in modules:
        return "late"
    if busy():
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "passive"
    return "default"


OMP_PAUSE_HARD = 2  # OpenMP 5.0's omp_pause_hard


def _openmp_pause():
    """`omp_pause_resource_all` of the OpenMP library torch runs on (None where it cannot be found)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    paths = [
        p for pattern in ("libgomp*", "libiomp*", "libomp*") for p in sorted(glob.glob(os.path.join(folder, pattern)))
    ]
    for path in paths + [None]:  # torch's own copy first, else whatever this process has loaded
        try:
            fn = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
        except OSError:
            continue
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    return None


_PAUSE: list = []  # the function, looked up once


def release_openmp_threads() -> bool:
    """Give back the calling thread's OpenMP worker threads (`omp_pause_resource_all(omp_pause_hard)`), so that the
    thread that runs the model from now on (a scheduler's worker) has the only team (the module docstring). Its
    next parallel region, if any, starts a new team. Timing only, never results (the thread count is unchanged).
    Returns whether they were given back (False: torch not loaded, no such function, or inside a parallel region)."""
    if not _PAUSE:
        fn = _openmp_pause()
        if fn is None:
            return False
        _PAUSE.append(fn)
    return _PAUSE[0](OMP_PAUSE_HARD) == 0
