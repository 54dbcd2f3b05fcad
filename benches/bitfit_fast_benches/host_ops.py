"""The host's share of a GPU step, counted on a CPU: the aten operations and Triton launches one step of the GPU
code path dispatches, for one task's BitFit model and for a TaskBank, in training and in prediction.

    TRITON_INTERPRET=1 python -m bitfit_fast_benches.host_ops --layers 12 --batch 64 --tasks 64

At batch 64 an eager step on a GPU is host-bound (on the H200 the GPU was busy 8.4 ms of the single-task model's
49.5 ms training step: ``benches/results/task-bank/gpu.json``), so what the host dispatches sets the step's time;
there a Triton launch cost the host about as much as 2.7 aten operations (26 µs against 9.7:
``benches/results/gpu/sweep.json``). The model is a 12-layer BERT of hidden size 64: the counts do not depend on
the sizes. The Triton kernels run under the interpreter with every launch counted and skipped (their outputs are
garbage; the host's path is the GPU's), and the linear layers take cuBLAS where a GPU would.
"""

import argparse
import contextlib
import random

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SEQ = 16  # tokens per example at most; each example gets a random length from 4


class _Dispatches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_code_path():
    """Within: every Triton launch counted and skipped, and cuBLAS wherever a GPU's linear layers run it. Yields
    the launch counter, a list of one int."""
    from triton.runtime import interpreter

    import bitfit_fast_kernels.heads as heads
    import bitfit_fast_kernels.linear as linear

    if not isinstance(heads._heads_to_rows_kernel, interpreter.InterpretedFunction):
        raise RuntimeError("the kernels were not compiled for the interpreter: set TRITON_INTERPRET=1 before "
                           "anything imports bitfit_fast_kernels")
    launches = [0]
    real_run, real_choice = interpreter.InterpretedFunction.run, linear._gemm_choice

    def skip(self, *args, **kwargs):
        launches[0] += 1

    def gpu_choice(gemm, x, activation, dropout_p):
        # linear_forward's "auto" on a CUDA tensor
        if gemm == "auto" and activation in (None, "gelu") and dropout_p == 0.0:
            return "cublas"
        return real_choice(gemm, x, activation, dropout_p)

    interpreter.InterpretedFunction.run, linear._gemm_choice = skip, gpu_choice
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run, linear._gemm_choice = real_run, real_choice


def steps(layers: int, batch: int, tasks: int | None) -> dict:
    """{"train": step, "predict": step} of one task's model (``tasks`` None) or a bank of ``tasks`` tasks, each
    example of a task of its own as far as they go, on one fixed batch."""
    import transformers

    import bitfit_fast
    from bitfit_fast.task_bank import TaskBank

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=1000, num_labels=2)
    model = transformers.BertForSequenceClassification(config).train()
    lengths = torch.randint(4, SEQ + 1, (batch,))
    inputs = dict(input_ids=torch.randint(0, config.vocab_size, (batch, SEQ)),
                  attention_mask=(torch.arange(SEQ)[None] < lengths[:, None]).long())
    labels = torch.zeros(batch, dtype=torch.long)
    if tasks is None:
        bitfit_fast.apply(model, backend="triton", announce=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

        def train():
            optimizer.zero_grad()
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()

        def predict():
            with torch.no_grad():
                model(**inputs)

        return dict(train=train, predict=predict)
    bank = TaskBank.new(model, {f"task{t}": 2 + t % 4 for t in range(tasks)}, backend="triton")
    names = [f"task{i % tasks}" for i in range(batch)]
    random.Random(0).shuffle(names)
    optimizer = bank.optimizer(lr=1e-4)

    def train():
        optimizer.zero_grad()
        bank.loss(bank(names, **inputs), labels, names).backward()
        optimizer.step(names)

    def predict():
        with torch.no_grad():
            bank(names, **inputs)

    return dict(train=train, predict=predict)


def count(step, warmup: int = 2) -> dict:
    """{"aten_ops", "triton_launches"} of one ``step()`` after ``warmup`` (optimizer state, caches)."""
    with gpu_code_path() as launches:
        for _ in range(warmup):
            step()
        launches[0] = 0
        with _Dispatches() as dispatches:
            step()
    return dict(aten_ops=dispatches.count, triton_launches=launches[0])


def run(layers: int, batch: int, tasks: int) -> dict:
    """{model: {mode: counts}} of the single-task model and the bank."""
    models = {"single-task model": None, f"bank of {tasks} tasks": tasks}
    return {name: {mode: count(step) for mode, step in steps(layers, batch, n).items()}
            for name, n in models.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    by_model = run(args.layers, args.batch, args.tasks)
    print(f"{args.layers}-layer BERT, batch {args.batch}: aten ops / Triton launches per step")
    for name, modes in by_model.items():
        print(f"  {name}: " + ", ".join(f"{mode} {counts['aten_ops']} / {counts['triton_launches']}"
                                        for mode, counts in modes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
