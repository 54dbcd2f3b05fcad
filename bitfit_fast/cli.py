"""`bitfit-fast`: the command-line entry point."""

import argparse
import shlex
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.update_readme:
        bench.update_readme(Path(args.readme), Path(args.out))
        print(f"updated the benchmark section of {args.readme} from {args.out}/*.json")
        return 0
    command = "bitfit-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = bench.run(args.preset, command)
    for kind, path in bench.write(record, Path(args.out)).items():
        print(f"wrote {kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import PRESETS

    parser = argparse.ArgumentParser(prog="bitfit-fast", description="BitFit fine-tuning with fused Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("bench", help="benchmark reference BitFit, full fine-tuning and bitfit_fast")
    b.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    b.add_argument("--out", default="benches/results", help="directory for the JSON, Markdown and PNG results")
    b.add_argument("--update-readme", action="store_true", help="regenerate README's section from --out/*.json")
    b.add_argument("--readme", default="README.md")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
