"""The tree is formatted (`ruff format`) and its imports sorted (`ruff check`, rule set I), with the settings in
pyproject.toml: the README's test command fails on unformatted code. Fix with
`.venv/bin/ruff format . && .venv/bin/ruff check --fix .`."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["softprompt", "tests", "benchmarks"]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "imports"])
def test_the_tree_is_formatted_and_its_imports_sorted(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
