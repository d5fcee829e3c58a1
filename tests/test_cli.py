"""The command line: every verb exists, and --help explains every flag."""

import argparse
import subprocess
import sys

import pytest

from softprompt.cli import VERBS, build_parser


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_all_verbs_are_registered():
    assert set(_subparsers(build_parser())) == set(VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_flag_has_help(verb):
    sub = _subparsers(build_parser())[verb]
    assert sub.description or sub.format_usage()
    missing = [a.dest for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert missing == [], f"softprompt {verb}: flags without help: {missing}"


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "softprompt", "--help"], capture_output=True, text=True, check=True)
    for verb in VERBS:
        assert verb in out.stdout
