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
    missing = [
        a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())
    ]
    assert missing == [], f"softprompt {verb}: flags without help: {missing}"


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "softprompt", "--help"], capture_output=True, text=True, check=True)
    for verb in VERBS:
        assert verb in out.stdout


def test_serve_refuses_a_public_address_without_a_key_before_loading_anything(capsys):
    from softprompt.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("softprompt serve: error: --host 0.0.0.0 makes the server reachable from other machines")
    assert err.endswith("set --api-key (or $SOFTPROMPT_API_KEY), or pass --allow-insecure to do it anyway\n")
    assert err.count("\n") == 1


def test_serve_flags_cover_the_servers_access_settings():
    text = _subparsers(build_parser())["serve"].format_help()
    for flag in [
        "--allow-admin",
        "--allow-insecure",
        "--allowed-hosts",
        "--allow-origins",
        "--max-request-bytes",
        "--api-key",
        "--host",
    ]:
        assert flag in text
