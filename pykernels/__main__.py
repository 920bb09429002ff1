"""Command line: ``python -m pykernels info`` and ``python -m pykernels bench``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pykernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built: engines, CUDA archs, Triton, versions, threads")
    bench = sub.add_parser("bench", help="run the benchmark report")
    from .bench.runner import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._info import format_info

        print(format_info())
        return 0
    from .bench.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
