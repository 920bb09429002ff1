"""Command line: ``python -m pykernels info``, ``selftest`` and ``bench``."""
from __future__ import annotations

import argparse
import sys


def _selftest(args) -> int:
    import os

    import torch

    if args.device == "cpu":
        # The Triton engine runs on CPU tensors under its interpreter; triton reads this when kernels are
        # first defined, which pykernels defers to the first Triton call.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from .selftest import ALL_DTYPES, format_rows, selftest, verdict

    if args.device == "cuda" and not torch.cuda.is_available():
        print("selftest: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = [d for d in ALL_DTYPES if str(d).removeprefix("torch.") in args.dtype] if args.dtype else None
    sizes = ("small", "medium") if args.size == "both" else (args.size,)

    def progress(row):
        print(f"  {row.family:9} {row.case:32} {row.size:6} {row.dtype:8} {row.engine:6} "
              f"{'ok' if row.passed else 'FAIL'}", flush=True)

    rows = selftest(args.device, engines=args.engine, sizes=sizes, dtypes=dtypes, families=args.family,
                    progress=None if args.quiet else progress)
    print(format_rows(rows))
    print(verdict(rows, args.device))
    failed = any(not r.passed for r in rows) or not rows
    if args.bench and not failed:
        from .bench.runner import add_arguments, run

        bench = argparse.ArgumentParser()
        add_arguments(bench)
        return run(bench.parse_args(["--quick", "--device", args.device]))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pykernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built: engines, CUDA archs, Triton, versions, threads")
    check = sub.add_parser("selftest", help="every op on every available engine against the reference")
    check.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device to test (default cuda)")
    check.add_argument("--size", default="both", choices=("small", "medium", "both"))
    check.add_argument("--dtype", action="append", choices=("float32", "float64", "float16", "bfloat16"),
                       help="only these dtypes (repeatable; default all)")
    check.add_argument("--family", action="append", choices=("graph", "attention", "window", "flow"),
                       help="only these families (repeatable; default all)")
    check.add_argument("--engine", action="append", choices=("cpu", "cuda", "triton"),
                       help="only these engines (repeatable; default every engine available on the device)")
    check.add_argument("--quiet", action="store_true", help="no per-row progress, only the table and verdict")
    check.add_argument("--bench", action="store_true", help="then run bench --quick on the device if all passed")
    bench = sub.add_parser("bench", help="run the benchmark report")
    from .bench.runner import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._info import format_info

        print(format_info())
        return 0
    if args.command == "selftest":
        return _selftest(args)
    from .bench.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
