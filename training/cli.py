"""Shared command-line plumbing: turn project errors into one `error: ...` line, exit 2."""
from __future__ import annotations

import sys
from typing import Callable

from .errors import TrainingError


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (continue with --resume)", file=sys.stderr)
        sys.exit(130)
