"""OpenMP wait settings: softprompt bounds the spin before torch loads, and never overrides the user's choice."""

import os
import subprocess
import sys

import pytest

from softprompt import runtime

WAITS = runtime.WAIT_VARIABLES + (runtime.OPT_OUT,)


def test_a_bounded_spin_is_set_when_torch_is_not_loaded_and_the_user_chose_nothing():
    environ: dict[str, str] = {"PATH": "/bin"}
    assert runtime.configure_openmp_waits(environ, modules={}) == "set"
    assert environ == {"PATH": "/bin", "GOMP_SPINCOUNT": str(runtime.SPIN_COUNT),
                       "KMP_BLOCKTIME": str(runtime.BLOCK_TIME_MS)}


@pytest.mark.parametrize("variable,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("OMP_WAIT_POLICY", "PASSIVE"),
                                            ("GOMP_SPINCOUNT", "1"), ("KMP_BLOCKTIME", "0"),
                                            ("SOFTPROMPT_OMP_WAIT", "keep")])
def test_the_users_choice_is_kept(variable, value):
    environ = {variable: value}
    assert runtime.configure_openmp_waits(environ, modules={}) == "user"
    assert environ == {variable: value}


def test_nothing_is_set_once_torch_is_loaded():
    environ: dict[str, str] = {}
    assert runtime.configure_openmp_waits(environ, modules={"torch": object()}) == "late"
    assert environ == {}


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAITS}
    env.update(extra)
    return env


PROBE = ("import os, sys; import {module}; assert 'torch' not in sys.modules; "
         "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'), os.environ.get('OMP_WAIT_POLICY'))")


@pytest.mark.parametrize("module", ["softprompt", "softprompt.cli"])
def test_import_softprompt_and_the_cli_set_it_before_torch(module):
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=clean_env(),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(runtime.SPIN_COUNT), str(runtime.BLOCK_TIME_MS), "None"]


def test_a_user_policy_reaches_torch_unchanged():
    out = subprocess.run([sys.executable, "-c", PROBE.format(module="softprompt")],
                         env=clean_env(OMP_WAIT_POLICY="ACTIVE"), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None", "ACTIVE"]
