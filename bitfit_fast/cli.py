"""`bitfit-fast`: the command-line entry point."""

import argparse
import shlex
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from bitfit_fast_benches import report, runner

    if args.update_readme:
        report.update_readme(Path(args.readme), Path(args.out))
        print(f"updated the benchmark section of {args.readme} from {args.out}/*.json")
        return 0
    command = "bitfit-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = runner.run(args.preset, command, providers=args.providers)
    for kind, path in report.write(record, Path(args.out)).items():
        print(f"wrote {kind}: {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .data import DataError
    from .trainer import TrainConfig, TrainingDiverged, sweep, train

    config = TrainConfig(
        model=args.model, task=args.task, train_file=args.train_file, validation_file=args.validation_file,
        text_columns=tuple(args.text_columns), label_column=args.label_column, regression=args.regression,
        method=args.method, learning_rate=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
        seed=args.seed, precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        max_grad_norm=args.max_grad_norm, output_dir=args.output_dir, save_every=args.save_every,
        resume=args.resume, backend=args.backend, memory=args.memory, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, progress=not args.no_progress,
    )
    try:
        sweep(config) if args.lr_sweep else train(config)
    except (DataError, TrainingDiverged, FileNotFoundError) as error:
        print(f"bitfit-fast train: error: {error}", file=sys.stderr)
        return 2
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .serve import evaluate_checkpoints

    for path, scores in evaluate_checkpoints(args.checkpoint, args.validation_file).items():
        print(f"{path}: " + " | ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                                         for split, m in scores.items()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from .serve import predict

    texts = [(t,) for t in args.text] if args.text else None
    for row in predict(args.checkpoint, texts=texts, input_file=args.input_file):
        print(json.dumps(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bitfit_fast_benches.presets import PRESETS

    parser = argparse.ArgumentParser(prog="bitfit-fast", description="BitFit fine-tuning with fused Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("bench", help="benchmark reference BitFit, full fine-tuning and bitfit_fast")
    b.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    b.add_argument("--providers", nargs="+", help="run these providers instead of the preset's")
    b.add_argument("--out", default="benches/results", help="directory for the JSON, Markdown and PNG results")
    b.add_argument("--update-readme", action="store_true", help="regenerate README's section from --out/*.json")
    b.add_argument("--readme", default="README.md")
    b.set_defaults(func=_bench)

    t = commands.add_parser("train", help="fine-tune with BitFit (no arguments: the embedded offline demo)")
    t.add_argument("--model", help="Hugging Face encoder name or path (default: the embedded all-MiniLM-L6-v2)")
    t.add_argument("--task", help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli (needs a network)")
    t.add_argument("--train-file", help="local CSV/JSON/Parquet training file")
    t.add_argument("--validation-file", help="local CSV/JSON/Parquet validation file")
    t.add_argument("--text-columns", nargs="+", default=["text"], help="one or two text columns of local files")
    t.add_argument("--label-column", default="label")
    t.add_argument("--regression", action="store_true", help="the label is a score (one output, MSE loss)")
    t.add_argument("--method", choices=["bitfit", "subset", "full", "frozen"], default="bitfit",
                   help="biases + head (bitfit), query+intermediate biases + head (subset), all weights (full), head only (frozen)")
    t.add_argument("--lr", type=float, help="learning rate (default: 1e-3 BitFit, 1e-4 BitFit on MNLI, 1e-5 full)")
    t.add_argument("--lr-sweep", action="store_true", help="one run per learning rate of the paper's grid; report the best")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step, over all processes")
    t.add_argument("--micro-batch-size", type=int, help="examples per forward pass (default: fit to GPU memory)")
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    precision = t.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with loss scaling")
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--output-dir", default="runs/bitfit")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: each epoch)")
    t.add_argument("--resume", action="store_true", help="continue exactly from --output-dir's checkpoint")
    t.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    t.add_argument("--memory", choices=["default", "lean", "minimal"], default="default")
    t.add_argument("--max-train-examples", type=int)
    t.add_argument("--max-eval-examples", type=int)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    e = commands.add_parser("eval", help="evaluate saved bias checkpoints (one base model, bias sets swapped)")
    e.add_argument("checkpoint", nargs="+", help="output directories of `bitfit-fast train`")
    e.add_argument("--validation-file", help="evaluate on this file instead of the run's validation data")
    e.set_defaults(func=_evaluate)

    p = commands.add_parser("predict", help="predict labels with a saved bias checkpoint")
    p.add_argument("checkpoint", help="output directory of `bitfit-fast train`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="texts to classify")
    source.add_argument("--input-file", help="CSV/JSON/Parquet file with the run's text columns")
    p.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
