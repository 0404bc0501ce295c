"""``python -m fastadam <command>``: the package's command line.

Commands:
    bench   measure the Adam step against the memory roofline, NumPy and torch
            (the same as the ``fastadam-bench`` script; see ``fastadam.bench``)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: python -m fastadam <command> [options]

commands:
  bench    measure the Adam step per backend and size against the memory
           roofline, the NumPy reference and torch (python -m fastadam bench --help)
"""

COMMANDS = ("bench",)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; return the exit status (2 when none or an unknown one is given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not args or args[0] not in COMMANDS:
        if args:
            print(f"python -m fastadam: unknown command {args[0]!r}", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        return 2
    # Imported here so that the usage message never pays for numpy and friends.
    from .bench import main as bench_main

    return bench_main(args[1:], prog="python -m fastadam bench")


if __name__ == "__main__":
    sys.exit(main())
