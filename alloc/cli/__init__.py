"""The ``bitalloc`` command. Each subcommand is one step of the flow in DESIGN.md; ``allocate`` runs them all.

    parser.py    the arguments of every command (argparse; a usage mistake is one line)
    common.py    argument groups, up-front checks, preparing the model, printed tables
    flow.py      allocate, probe, solve, eval, apply
    explore.py   sweep, search, dashboard
    publish.py   export, report

Errors in the user's input print one line (``bitalloc: error: ...``) and exit with status 2, before any
slow work where they can be checked up front, and without leaving a partial file.
"""
from __future__ import annotations

import sys
import warnings

from ..errors import BitallocError, BitallocWarning, SettingError
from .explore import uniform_curve_at
from .parser import build_parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"bitalloc: warning: {message}" if issubclass(category, BitallocWarning) else
          warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a container stop): unwinds like Ctrl-C, so temporary files go away."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:                          # not the main thread (main() called from a thread): leave it
        previous = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)             # third-party chatter
            warnings.simplefilter("always", BitallocWarning)         # ours: one line each
            warnings.showwarning = _show_warning
            args.func(args)
    except SettingError as e:                   # a setting named as its flag
        from .common import flag_for
        print(f"bitalloc: error: {e.worded(flag_for(e.field))}", file=sys.stderr)
        return 2
    except BitallocError as e:
        print(f"bitalloc: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("bitalloc: terminated (SIGTERM): nothing partial was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from ..files import is_write_error, os_error_line
        if not is_write_error(e):
            raise
        print(f"bitalloc: error: {os_error_line(e, getattr(e, 'filename', None) or 'a file')}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


__all__ = ["main", "build_parser", "uniform_curve_at"]
