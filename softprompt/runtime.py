"""Process-wide settings that must be made before torch loads: how OpenMP threads wait for each other.

torch's CPU kernels split work over OpenMP threads, and between parallel regions an idle thread either spins (keeps
its core busy, ready at once) or sleeps (gives the core away, wakes a few microseconds later). GNU OpenMP's default
spins for a long time (300,000 iterations per wait), which is fastest on an idle machine and disastrous on a busy
one: a thread that spins while the thread it waits for has been descheduled burns the very core that thread needs.
Measured on 2 cores (docs/benchmarks.md, benchmarks/contention.py): training ran ~18x slower beside other work.
Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) holds up under load but costs ~15% on an idle machine.

softprompt therefore sets a *bounded* spin: a waiting thread spins briefly (long enough to catch the next parallel
region of a busy step, which usually starts within microseconds) and then sleeps. The bound is `SPIN_COUNT`
iterations for GNU OpenMP (`GOMP_SPINCOUNT`, what torch's Linux wheels use) and `BLOCK_TIME_MS` for Intel/LLVM
OpenMP (`KMP_BLOCKTIME`). It is applied only when torch is not imported yet (the runtime reads the variables once,
when it starts) and only when the user has set none of the wait variables: `OMP_WAIT_POLICY=ACTIVE` or `PASSIVE`,
`GOMP_SPINCOUNT` or `KMP_BLOCKTIME` in the environment always win. `SOFTPROMPT_OMP_WAIT=keep` leaves OpenMP's own
default in place.

This module imports nothing from softprompt and nothing heavy: `softprompt/__init__.py` calls it first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SPIN_COUNT = 10_000  # GNU OpenMP spin iterations before sleeping (its default is 300,000; PASSIVE is 0)
BLOCK_TIME_MS = 1  # the same bound for Intel/LLVM OpenMP, in milliseconds (its default is 200)
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OPT_OUT = "SOFTPROMPT_OMP_WAIT"  # "keep": leave OpenMP's default waits alone


def configure_openmp_waits(environ: MutableMapping[str, str] | None = None,
                           modules: dict | None = None) -> str:
    """Set a bounded OpenMP spin before torch loads, unless the user chose a wait policy. Returns what was done:
    'set', 'user' (a wait variable was already set, or the opt-out), or 'late' (torch was already imported, so the
    setting could no longer take effect)."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if environ.get(OPT_OUT, "").strip().lower() == "keep" or any(v in environ for v in WAIT_VARIABLES):
        return "user"
    if "torch" in modules:
        return "late"
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    environ["KMP_BLOCKTIME"] = str(BLOCK_TIME_MS)
    return "set"
