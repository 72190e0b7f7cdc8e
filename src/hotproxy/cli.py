"""The ``hotproxy`` command (placeholder until the program issue lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("hotproxy: the program is not built yet", file=sys.stderr)
    return 1
