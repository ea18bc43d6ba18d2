"""What every `speechlm` command shares: exit codes and how bad input is reported."""

from __future__ import annotations

import sys

# 0 success; 1 the run failed (or broken data was found); 2 bad input (config, arguments, data); 130 Ctrl-C.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def bad_input(exc: BaseException | str) -> int:
    """Print `error: <what and how to fix it>` and return the bad-input exit code."""
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT
