"""OpenMP wait settings: softprompt bounds the spin before torch loads, and never overrides the user's choice."""

import contextlib
import os
import subprocess
import sys
import time

import pytest

from softprompt import runtime

WAITS = runtime.WAIT_VARIABLES + (runtime.OPT_OUT,)


def test_openmps_default_on_a_quiet_machine():
    environ: dict[str, str] = {"PATH": "/bin"}
    assert runtime.configure_openmp_waits(environ, modules={}, busy=lambda: False) == "default"
    assert environ == {"PATH": "/bin"}


def test_passive_waits_on_a_busy_machine():
    environ: dict[str, str] = {}
    assert runtime.configure_openmp_waits(environ, modules={}, busy=lambda: True) == "passive"
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    "counts,cores,busy",
    [
        ([1, 1, 2, 1, 1], 2, False),  # only this process (one sample catches a short-lived task)
        ([2, 2, 3, 2, 2], 2, True),  # one other runnable task on 2 cores: half of them
        ([3, 3, 3, 3, 3], 2, True),  # one competitor per core
        ([2, 2, 2, 2, 2], 4, False),  # one other task on 4 cores: a quarter
        ([1, None, 1, 1, 1], 2, False),  # unknown: never busy
    ],
)
def test_busy_means_other_runnable_tasks_fill_half_the_cores(monkeypatch, counts, cores, busy):
    samples = iter(counts)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert runtime.machine_is_busy(lambda: next(samples), samples=5, interval=0) is busy


def test_runnable_tasks_counts_this_process_at_least():
    count = runtime.runnable_tasks()
    assert count is None or count >= 1


@pytest.mark.parametrize(
    "variable,value",
    [
        ("OMP_WAIT_POLICY", "ACTIVE"),
        ("OMP_WAIT_POLICY", "PASSIVE"),
        ("GOMP_SPINCOUNT", "1"),
        ("KMP_BLOCKTIME", "0"),
        ("SOFTPROMPT_OMP_WAIT", "keep"),
    ],
)
def test_the_users_choice_is_kept(variable, value):
    environ = {variable: value}
    assert runtime.configure_openmp_waits(environ, modules={}, busy=lambda: True) == "user"
    assert environ == {variable: value}


def test_nothing_is_set_once_torch_is_loaded():
    environ: dict[str, str] = {}
    assert runtime.configure_openmp_waits(environ, modules={"torch": object()}) == "late"
    assert environ == {}


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAITS}
    env.update(extra)
    return env


PROBE = (
    "import os, sys; import {module}; assert 'torch' not in sys.modules; "
    "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'), os.environ.get('OMP_WAIT_POLICY'))"
)


@contextlib.contextmanager
def competitors():
    """One CPU-bound process per core, running until the block ends: a busy machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("module", ["softprompt", "softprompt.cli"])
def test_import_softprompt_and_the_cli_choose_passive_waits_on_a_busy_machine_before_torch(module):
    with competitors():
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(module=module)],
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    assert out == ["None", "None", "PASSIVE"]


def test_a_user_policy_reaches_torch_unchanged():
    with competitors():
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(module="softprompt")],
            env=clean_env(OMP_WAIT_POLICY="ACTIVE"),
            capture_output=True,
            text=True,
            check=True,
        )
    assert out.stdout.split() == ["None", "None", "ACTIVE"]


def test_a_thread_gives_back_its_openmp_team():
    """A thread that ran a parallel region keeps a team of OpenMP threads; release_openmp_threads ends them (the
    process has as many OS threads as before), and the thread's next parallel region works as before."""
    import threading

    import torch

    if not sys.platform.startswith("linux"):
        pytest.skip("counts Linux threads (/proc)")
    x = torch.randn(512, 512)
    threads = torch.get_num_threads()
    counts, results = {}, []

    def work():
        counts["before"] = len(os.listdir("/proc/self/task"))
        first = x @ x  # a parallel region: this thread's team starts
        counts["with team"] = len(os.listdir("/proc/self/task"))
        results.append(runtime.release_openmp_threads())
        counts["after"] = len(os.listdir("/proc/self/task"))
        results.append(torch.equal(x @ x, first))

    torch.set_num_threads(2)  # a team of 2: the thread and one OpenMP thread
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(threads)
    assert results == [True, True]
    assert counts["with team"] > counts["before"] == counts["after"]
