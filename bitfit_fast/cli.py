"""`bitfit-fast`: the command-line entry point."""

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import shlex
import sys
import textwrap
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    import torch

    from bitfit_fast_benches import report, runner
    from bitfit_fast_benches.presets import PRESETS
    from bitfit_fast_benches.providers import GRAPHED

    from .errors import UserError

    out = Path(args.out)
    if args.update_readme:
        readme = Path(args.readme)
        if not readme.is_file() or report.README_START not in readme.read_text():
            raise UserError(f"--readme {readme} is not a README with a generated benchmark section (its "
                            f"{report.README_START} marker): run from the repository root or pass --readme PATH")
        try:
            records = report.records(out)
        except ValueError as error:
            raise UserError(f"--out {args.out}: {error}") from error
        if not records:  # the section would be emptied
            raise UserError(f"--out {args.out} holds no benchmark results (*.json): pass the directory that holds "
                            "them, e.g. --out benches/results")
        report.update_readme(readme, out)
        print(f"updated the benchmark section of {args.readme} from {args.out}/*.json")
        return 0
    if not torch.cuda.is_available():
        if PRESETS[args.preset].device == "cuda":
            raise UserError(f"--preset {args.preset} needs a CUDA GPU; use --preset cpu-small on this machine")
        graphed = [name for name in args.providers or () if name in GRAPHED]
        if graphed:
            raise UserError(f"--providers {' '.join(graphed)}: a CUDA graph's replay needs a CUDA GPU; leave "
                            f"{'them' if len(graphed) > 1 else 'it'} out on this machine")
    if out.exists() and not out.is_dir():  # found before the first workload runs, not after it
        raise UserError(f"--out {args.out} is a file: give a directory for the results")
    command = "bitfit-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = runner.run(args.preset, command, providers=args.providers,
                        checkpoint=lambda partial: report.write(partial, out))
    for kind, path in report.write(record, out).items():
        print(f"wrote {kind}: {path}")
    return 0


# The BitFitConfig fields that `bitfit-fast train` takes as options (--backend, --memory); --method sets `biases`.
BITFIT_OPTIONS = ("backend", "memory")


def train_config(args: argparse.Namespace):
    """The TrainConfig of parsed `bitfit-fast train` arguments."""
    from .config import BitFitConfig
    from .train import TrainConfig

    return TrainConfig(
        model=args.model, task=args.task, train_file=args.train_file, validation_file=args.validation_file,
        text_columns=tuple(args.text_columns), label_column=args.label_column, regression=args.regression,
        method=args.method, bitfit=BitFitConfig(**{name: getattr(args, name) for name in BITFIT_OPTIONS}),
        learning_rate=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
        seed=args.seed, split_seed=args.split_seed,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32" if args.fp32 else "auto",
        max_grad_norm=args.max_grad_norm, output_dir=args.output_dir, save_every=args.save_every,
        resume=args.resume, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, progress=not args.no_progress,
    )


def _train(args: argparse.Namespace) -> int:
    from .train import sweep, train

    config = train_config(args)
    if args.task_files:
        from .train.multitask import TaskFiles, train_tasks

        train_tasks(config, [TaskFiles(*files) for files in args.task_files])
    else:
        sweep(config) if args.lr_sweep else train(config)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .serve import evaluate_checkpoints

    results = evaluate_checkpoints(args.runs, args.validation_file)
    for path, scores in results.items() if _is_main_process() else ():  # under torchrun: every rank has them
        print(f"{path}: " + " | ".join(
            f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "examples") + f" ({m['examples']} "
            "examples)" for split, m in scores.items()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .serve import predict

    texts = None
    if args.text:
        texts = list(zip(args.text, args.text_pair)) if args.text_pair else [(t,) for t in args.text]
    for row in predict(args.run, texts=texts, input_file=args.input_file):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .files import temporaries_of_others
    from .serve import export

    out, model_class = export(args.run, args.output_dir)
    print(f"wrote {out}: a {model_class} with {args.run}'s best biases merged in, and its tokenizer; load it with "
          f"transformers' from_pretrained({str(out)!r}), no bitfit-fast needed")
    for leftover in temporaries_of_others(out):
        print(f"note: {leftover} is what an export into {out.name} left unfinished (killed?); delete it "
              "unless an export is still running", file=sys.stderr)
    return 0


def _check_listenable(host: str, port: int) -> None:
    import socket

    from .errors import UserError, first_line

    try:  # uvicorn's choice of address family: IPv6 for an address with a colon
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({first_line(error)}): choose another --port (or --host)") \
            from error


def _serve(args: argparse.Namespace) -> int:
    from .errors import UserError

    try:
        from .server import BatchingConfig, serve
    except ImportError as error:
        raise UserError(f"serving needs the 'serve' extra ({error.name} is missing): pip install "
                        "'bitfit-fast[serve]'") from error
    from .backend import check_backend_option
    from .serve import RunsPredictor

    check_backend_option(args.backend)  # both before the model loads (uvicorn reports a taken port only after it)
    _check_listenable(args.host, args.port)
    predictor = RunsPredictor(args.runs, backend=args.backend, truncate=args.truncate)
    print(f"serving {len(predictor.tasks)} task(s) on http://{args.host}:{args.port} in {predictor.precision}: "
          f"{', '.join(predictor.tasks)}", file=sys.stderr)
    serve(predictor, args.host, args.port,
          BatchingConfig(args.max_batch_size, args.max_wait_ms, args.max_queue, args.max_request_bytes))
    return 0


def _train_conflict(args: argparse.Namespace) -> str | None:
    if args.model is not None and not args.model.strip():
        return "--model is an empty name: give a hub name or a local directory, or leave it out for the embedded model"
    if len(args.text_columns) > 2:
        return f"--text-columns takes one or two columns, got {len(args.text_columns)}"
    if len(set(args.text_columns)) < len(args.text_columns):
        return f"--text-columns names {args.text_columns[0]!r} twice: a text pair is two columns"
    if args.label_column in args.text_columns:
        return f"--label-column {args.label_column!r} is also a text column: name the column that holds the labels"
    if args.task_files:  # first: the pairing checks below would give hints that do not apply to a joint run
        given = [option for option, value in (("--task", args.task), ("--train-file", args.train_file),
                                              ("--validation-file", args.validation_file),
                                              ("--resume", args.resume), ("--save-every", args.save_every),
                                              ("--lr-sweep", args.lr_sweep),
                                              ("--micro-batch-size", args.micro_batch_size)) if value]
        if given:
            return f"--task-files trains several tasks from their files in one process: leave out {', '.join(given)}"
    if bool(args.train_file) != bool(args.validation_file):
        return "--train-file and --validation-file go together: give both"
    if args.task and args.train_file:
        return "--task and --train-file/--validation-file are two data sources: give one"
    if args.lr_sweep and args.lr is not None:
        return "--lr-sweep tries the paper's learning rates itself: leave out --lr"
    from .train.config import LR_GRID, default_learning_rate, weight_decay_problem

    rate = max(LR_GRID) if args.lr_sweep else args.lr or default_learning_rate(args.method, args.task)
    problem = weight_decay_problem(args.weight_decay, rate)
    return f"--weight-decay {problem}" if problem else None


def _predict_conflict(args: argparse.Namespace) -> str | None:
    if args.text_pair and not args.text:
        return "--text-pair gives the second text of each --text: give --text too"
    if args.text_pair and len(args.text_pair) != len(args.text):
        return (f"--text-pair needs one text per --text: got {len(args.text)} --text and {len(args.text_pair)} "
                "--text-pair")
    return None


def _number(kind: type, minimum: float, above: bool = False, maximum: float = math.inf):
    """An argparse type: a finite ``kind`` that is at least ``minimum`` (more than it, with ``above``) and at most
    ``maximum``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):  # an int is finite, and too large for isfinite's float
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} {minimum}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value

    return parse


POSITIVE_INT, COUNT, PORT = _number(int, 1), _number(int, 0), _number(int, 1, maximum=65535)
POSITIVE, NON_NEGATIVE = _number(float, 0, above=True), _number(float, 0)
LEARNING_RATE = _number(float, 0, above=True, maximum=1.0)  # train.config.MAX_LEARNING_RATE (that imports torch)
SEED = _number(int, -(2**63), maximum=2**63 - 1)  # torch.manual_seed's range, with room for the ranks' offsets


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each default, except for options that are off (or automatic) unless given; lines break
    between words only, never inside a name (gpu-roberta, --max-length)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _VersionAction(argparse.Action):
    """`--version`: :func:`_versions` on one line, as it is (argparse's version action wraps it at 80 columns,
    which a CUDA build's torch and CUDA versions reach)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line that says where to look, not argparse's usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def _versions() -> str:
    """bitfit-fast's version and those a bug report needs: torch (with its CUDA), triton, transformers."""
    import importlib.metadata

    import torch

    from . import __version__

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return (f"bitfit-fast {__version__} (torch {torch.__version__}{cuda}, triton {version('triton')}, "
            f"transformers {version('transformers')})")


def build_parser() -> argparse.ArgumentParser:
    """The `bitfit-fast` parser: bench, train, eval, predict, export and serve, each with its options and their
    checks."""
    from bitfit_fast_benches.presets import PRESETS
    from bitfit_fast_benches.providers import PROVIDERS

    from .backend import BACKENDS
    from .config import BitFitConfig
    from .train import METHODS
    from .train.data import GLUE

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback, not just its message")
    parser = _Parser(prog="bitfit-fast", description="BitFit fine-tuning with fused Triton kernels",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action=_VersionAction,
                        help="show the versions of bitfit-fast and of what it runs on, and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, func) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, parents=[common],
                                  formatter_class=_HelpFormatter)
        sub.set_defaults(func=func)
        return sub

    b = command("bench", "benchmark reference BitFit, full fine-tuning and bitfit_fast", _bench)
    def sizes(workloads) -> str:  # "bert-base", or "roberta at bert-base's size"
        return "/".join(sorted({w.model if w.arch == "bert" else f"{w.arch} at {w.model}'s size" for w in workloads}))

    presets = "; ".join(f"{name}: {preset.device}, {len(preset.workloads)} workload"
                        f"{'s' if len(preset.workloads) > 1 else ''} of {sizes(preset.workloads)}"
                        for name, preset in PRESETS.items())
    b.add_argument("--preset", choices=list(PRESETS), default="cpu-small",
                   help=f"what to measure ({presets}); tiny is a smoke test of about a minute")
    b.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="PROVIDER",
                   help=f"run these providers instead of the preset's (of {', '.join(PROVIDERS)})")
    b.add_argument("--out", default="runs/bench",
                   help="directory for the JSON, Markdown and PNG results (the committed ones: benches/results)")
    b.add_argument("--update-readme", action="store_true", help="regenerate README's section from --out/*.json")
    b.add_argument("--readme", default="README.md", help="the README that --update-readme rewrites")

    t = command("train", "fine-tune with BitFit (no arguments: the embedded offline demo)", _train)
    data = t.add_argument_group("data (default: the embedded BBC News, offline)")
    data.add_argument("--task", choices=list(GLUE), help="a GLUE task, through `datasets` (needs the network)")
    data.add_argument("--train-file", help="local CSV/JSON/Parquet training file (with --validation-file)")
    data.add_argument("--validation-file", help="local CSV/JSON/Parquet validation file")
    data.add_argument("--task-files", nargs=3, action="append", metavar=("NAME", "TRAIN", "VALIDATION"),
                      help="a task to train together with the others given so (mixed batches, one model): its name "
                           "and files; OUTPUT_DIR/NAME becomes its run (repeat for each task)")
    data.add_argument("--text-columns", nargs="+", default=["text"], help="one or two text columns of local files")
    data.add_argument("--label-column", default="label", help="label column of local files")
    data.add_argument("--regression", action="store_true", help="the label is a score (one output, MSE loss)")
    data.add_argument("--max-train-examples", type=POSITIVE_INT, help="train on the first N examples only")
    data.add_argument("--max-eval-examples", type=POSITIVE_INT, help="evaluate on the first N examples only")
    t.add_argument("--model", help="Hugging Face encoder: hub name or local directory (default: the embedded "
                                   "all-MiniLM-L6-v2)")
    t.add_argument("--method", choices=METHODS, default="bitfit",
                   help="what trains: all biases + head (bitfit), query and intermediate biases + head (subset), "
                        "every weight (full), the head only (frozen)")
    t.add_argument("--lr", type=LEARNING_RATE,
                   help="learning rate (default: 1e-3 BitFit, 1e-4 BitFit on MNLI, 1e-5 full)")
    t.add_argument("--lr-sweep", action="store_true",
                   help="one run per learning rate of the paper's grid, in --output-dir/lr-*; reports the best")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay")
    t.add_argument("--epochs", type=POSITIVE_INT, default=3, help="passes over the training data")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per optimizer step, over all processes")
    t.add_argument("--micro-batch-size", type=POSITIVE_INT,
                   help="examples per forward pass (default: the whole batch on CPU, the most that fits on a GPU)")
    t.add_argument("--max-length", type=POSITIVE_INT, default=128, help="tokens per example; longer ones are cut")
    t.add_argument("--seed", type=SEED, default=0, help="seed of the data order, dropout and the new head")
    t.add_argument("--split-seed", type=SEED, default=0,
                   help="seed of the embedded BBC News' 80/20 split (fixed whatever --seed is)")
    precision = t.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="bf16 autocast (the default on a GPU that has bf16)")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with loss scaling")
    precision.add_argument("--fp32", action="store_true", help="no autocast (the default on CPU)")
    t.add_argument("--max-grad-norm", type=POSITIVE, default=1.0, help="gradient clipping")
    t.add_argument("--output-dir", default="runs/bitfit",
                   help="where biases/ (best epoch), biases-last/, checkpoint.pt and the summary go")
    t.add_argument("--save-every", type=COUNT, default=0, help="also checkpoint every N steps (0: each epoch only)")
    t.add_argument("--resume", action="store_true", help="continue exactly from --output-dir's checkpoint")
    bitfit = t.add_argument_group("BitFit options (the fields of bitfit_fast.BitFitConfig)")
    for field in dataclasses.fields(BitFitConfig):
        if field.name in BITFIT_OPTIONS:
            bitfit.add_argument(f"--{field.name.replace('_', '-')}", choices=field.metadata["choices"],
                                default=field.default, help=field.metadata["help"])
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is one only where stderr is a terminal)")
    t.set_defaults(conflict=_train_conflict)

    e = command("eval", "evaluate runs' best biases (one base model loaded, bias sets swapped)", _evaluate)
    e.add_argument("runs", nargs="+", metavar="RUN", help="output directories of `bitfit-fast train`")
    e.add_argument("--validation-file",
                   help="CSV/JSON/Parquet file with the runs' text and label columns (default: each run's own "
                        "validation data)")

    p = command("predict", "predict with a run's best biases: one JSON line per text, with label and probabilities "
                "(score for a regression run)",
                _predict)
    p.add_argument("run", metavar="RUN", help="output directory of `bitfit-fast train`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="texts to classify (the first text, for runs on two text columns)")
    source.add_argument("--input-file", help="CSV/JSON/Parquet file with the run's text columns")
    p.add_argument("--text-pair", nargs="+", help="the second text of each --text, for runs on two text columns")
    p.set_defaults(conflict=_predict_conflict)

    x = command("export", "a run's best biases merged into its base model, saved as a plain Hugging Face model "
                "directory (from_pretrained loads it without bitfit-fast)", _export)
    x.add_argument("run", metavar="RUN", help="output directory of `bitfit-fast train`")
    x.add_argument("output_dir", metavar="OUTPUT_DIR", help="new (or empty) directory for the model and its tokenizer")

    s = command("serve", "serve runs' best biases over HTTP: one model, every run a task, requests of any tasks "
                "batched together (needs the 'serve' extra)", _serve)
    s.add_argument("runs", nargs="+", metavar="RUN", help="output directories of `bitfit-fast train` on one base model"
                   " (each a task named by its directory)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=PORT, default=8000, help="port to listen on")
    s.add_argument("--max-batch-size", type=POSITIVE_INT, default=64, help="examples per model call")
    s.add_argument("--max-wait-ms", type=_number(float, 0, maximum=60_000.0), default=5.0,
                   help="how long a batch's first example waits for others (at most a minute: a lone request "
                        "waits that long)")
    s.add_argument("--max-queue", type=POSITIVE_INT, default=1024,
                   help="examples that may wait; beyond it requests get 503 and retry")
    s.add_argument("--max-request-bytes", type=POSITIVE_INT, default=8 * 2**20,
                   help="the largest request body read; a larger one gets 413")
    s.add_argument("--truncate", action="store_true",
                   help="cut a text longer than its task's --max-length to it, as predict and eval do, instead of "
                        "answering 422")
    s.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="Triton kernels or torch ops (auto: the kernels on a GPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`bitfit-fast`: a mistake the user can fix ends with one line and exit status 2 (`--debug`: the traceback)."""
    from .errors import UserError

    try:
        parser = build_parser()  # loads torch and transformers for the options' choices: seconds
    except KeyboardInterrupt:
        _error_line("bitfit-fast: interrupted")
        return 130
    args, unknown = parser.parse_known_args(argv)
    prefix = f"bitfit-fast {args.command}: error:"
    if unknown:  # argparse would name the top-level command, not the one they were given to
        _error_line(f"{prefix} unrecognized arguments: {' '.join(unknown)} (options: bitfit-fast {args.command} "
                    "--help)")
        return 2
    conflict = getattr(args, "conflict", lambda _: None)(args)
    if conflict:
        _error_line(f"{prefix} {conflict}")
        return 2
    try:
        status = args.func(args)
        _end_process_group()
        return status
    except UserError as error:
        if args.debug:
            raise
        _error_line(f"{prefix} {error}")
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        _error_line(f"bitfit-fast {args.command}: interrupted{_resume_hint(args)}")
        return 130  # the shell's status for a command ended by Ctrl-C
    except BrokenPipeError:  # before OSError, which it is
        if args.debug or args.command not in ("predict", "eval"):
            raise
        # What reads the results stopped (`bitfit-fast predict ... | head`): nothing to say. Python's flush of
        # stdout at exit would fail once more: it goes to devnull (where stdout is a file descriptor at all).
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the shell's status for a command ended by SIGPIPE
    except OSError as error:  # the machine's, not a bug: a full disk, a file this user may not read or write
        cause = _MACHINE_ERRORS.get(error.errno)
        if args.debug or cause is None:
            raise
        what, advice = cause
        # A write's error names no file (a full disk, through a Python file): the directory being written then.
        directory = getattr(args, "output_dir", None)
        where = f" ({error.filename})" if error.filename else f" (writing in {directory})" if directory else ""
        _error_line(f"{prefix} {what}{where}: {advice}{_resume_hint(args)}")
        return 2


def _error_line(line: str) -> None:
    """``line`` on stderr in one write: under torchrun every process says it, and print's two writes (the text,
    then the newline) ran the processes' lines together."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def _end_process_group() -> None:
    """A command that ran under torchrun ends its process group: left to the interpreter's exit, gloo's threads were
    once torn down under a process still using them (SIGABRT: torchrun reported a finished run as failed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_main_process() -> bool:
    """Whether this process prints a command's results: the only one, or torchrun's rank 0."""
    return os.environ.get("RANK", "0") == "0"


_MACHINE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space (files written before are whole)"),
    errno.EDQUOT: ("the disk quota is used up", "free some space (files written before are whole)"),
    errno.EACCES: ("permission denied", "give this user access to it, or use another path"),
    errno.EPERM: ("operation not permitted", "give this user access to it, or use another path"),
    errno.EROFS: ("a read-only file system", "write to another path"),
}


def _resume_hint(args) -> str:
    """What continues an interrupted `train`: its checkpoint, written atomically, is whole whenever it stopped; a
    joint run keeps no checkpoint, only its tasks' finished epochs."""
    from .train import BEST_BIASES, CHECKPOINT_NAME

    out = Path(getattr(args, "output_dir", None) or ".")
    if args.command != "train":
        return ""
    if getattr(args, "task_files", None):
        if not any((out / name / BEST_BIASES).exists() for name, *_ in args.task_files):
            return "; no epoch had finished: the same command starts it again"
        return (f"; a joint run has no --resume: the task runs in {out} keep the biases of the epochs that finished; "
                f"to train again, remove {out} or choose another --output-dir")
    if getattr(args, "lr_sweep", False):  # one run per learning rate, each in OUTPUT_DIR/lr-<rate>
        return (f"; the same command with --resume continues the sweep: the learning rates that finished are kept, "
                f"the one interrupted continues from its last checkpoint ({out}/lr-<rate>/{CHECKPOINT_NAME}), if "
                "it wrote one") if out.is_dir() else ""
    checkpoint = out / CHECKPOINT_NAME
    if checkpoint.is_file():
        return f"; the same command with --resume continues from its last checkpoint, {checkpoint}"
    return "; it stopped before its first checkpoint: the same command starts it again" if out.is_dir() else ""


if __name__ == "__main__":
    sys.exit(main())
