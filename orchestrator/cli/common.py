"""What every `speechlm` command shares: exit codes and how bad input is reported."""

from __future__ import annotations

import argparse
import sys

# 0 success; 1 the run failed (or broken data was found); 2 bad input (config, arguments, data); 130 Ctrl-C.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def bad_input(exc: BaseException | str) -> int:
    """Print `error: <what and how to fix it>` (credentials masked) and return the bad-input exit code."""
    from orchestrator.redaction import redact

    print(f"error: {redact(str(exc))}", file=sys.stderr)
    return EXIT_BAD_INPUT


def warn(message: str) -> None:
    """Print `warning: <message>` (credentials masked) to stderr."""
    from orchestrator.redaction import redact

    print(f"warning: {redact(message)}", file=sys.stderr)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a batch size, a shard size, a worker count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (hours, tolerances)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number above 0")
    return value
