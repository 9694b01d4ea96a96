"""`bitalloc --help` and usage errors answer at once (nothing heavy is imported before a command runs), and every
option says what it does and its default."""
import argparse
import subprocess
import sys

import pytest

from bitalloc.cli.parser import EXAMPLES, build_parser

HEAVY = ("torch", "transformers", "optuna", "pulp", "fastapi", "sqlalchemy", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["allocate", "--help"], ["apply", "--help"],
                                  ["allocate", "--budget", "x"]], ids=["help", "allocate-help", "apply-help",
                                                                      "usage-error"])
def test_help_and_usage_errors_import_nothing_heavy(argv):
    code = ("import sys\nfrom bitalloc.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", list(_commands()))
def test_every_option_has_help_and_says_its_default(name):
    command = _commands()[name]
    for action in command._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name} {label} has no help text"
        has_default = action.default not in (None, False, "", argparse.SUPPRESS) and not action.required
        if has_default:
            assert "default" in action.help, f"{name} {label}: its help does not say its default {action.default!r}"
    assert command.epilog and EXAMPLES[name] in command.epilog and f"bitalloc {name}" in EXAMPLES[name]


def test_probe_lists_the_probes_in_its_help(capsys):
    from bitalloc.registry import PROBES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["allocate", "--help"])
    out = capsys.readouterr().out
    assert all(p in out for p in PROBES)
