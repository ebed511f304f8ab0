"""How every command line ends: a result, or one line on stderr and exit status 2.

``run_cli(main, argv)`` calls ``main(argv)`` and turns any exception into ``error: <message>`` on one line
(the message already names the flag, file or record and the fix), exit status 2, no traceback; with
``--debug`` on the command line the traceback is printed first. Under torchrun only rank 0 prints, so a
failing 8-process run says it once. ``exit_on_option_error`` does the same for option parsing, exiting
at once with status 2 as argparse itself does.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

# Errors whose message is written for the user (a bad option, path, record, template, NaN): printed as
# they are. Anything else is a bug or an unexpected failure: its type is named as well.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def one_line(err: BaseException) -> str:
    """The error as one line: its lines joined, its type named unless it is a user error."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, USER_ERRORS) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def report_error(err: BaseException, *, debug: bool = False) -> None:
    if os.environ.get("RANK", "0") != "0":  # one message per run, not one per process
        return
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    hint = "" if debug or isinstance(err, USER_ERRORS) else " (run with --debug for the traceback)"
    print(f"error: {one_line(err)}{hint}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``'s exit status (0 unless it returns an int); any error -> one line, status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = main(argv)
    except SystemExit:
        raise  # --help, or an option error already reported by exit_on_option_error
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 (every error ends as one line: the point of this wrapper)
        report_error(err, debug="--debug" in argv)
        return 2
    return result if isinstance(result, int) else 0


def exit_on_option_error(parse: Callable[[], Any], argv: Sequence[str]) -> Any:
    """``parse()``, or on a bad option one line and SystemExit(2) (argparse's own status)."""
    from soulchat.commandline import ConfigError

    try:
        return parse()
    except ConfigError as err:
        report_error(err, debug="--debug" in argv)
        raise SystemExit(2) from None


def require_output_file(path: str | None, flag: str, example: str) -> None:
    """Refuse, at parse time, an output path that is an existing directory: open() would fail only after
    the model had loaded and every reply had been generated, with a bare "[Errno 21] Is a directory"."""
    from soulchat.commandline import ConfigError

    if path is not None and path != "-" and os.path.isdir(path):
        raise ConfigError(
            f"{flag} {path} is a directory: pass a file path, e.g. {os.path.join(path, example)}"
        )

