"""torch.compile of an applied model, as a user compiles it: the same logits, loss and bias gradients as the same
model uncompiled, on every layer path, config-built and real MiniLM; with dropout the same masks (drawn from the same
seeds), and after the first steps no recompilation.

The fused path graph-breaks where it must leave values to the host (the unpadded layout's lengths, dropout seeds, the
torch backend's dropout masks, drawn with numpy): dynamo runs those parts eagerly and compiles the rest, so what is
compiled must still compute what the uncompiled model does. ``aot_eager`` traces and splits forward and backward as
torch.compile does, without inductor's C++ builds (minutes on CI). The Triton backend runs on a GPU only: under the
CPU interpreter dynamo would trace into the interpreter itself.
"""

import contextlib
import copy
import json

import pytest
import torch
from bitfit_reference import (
    DEVICE,
    PATHS,
    bbc_titles,
    padded_batch,
    real_batch,
    real_minilm,
    reference_bitfit,
    tiny_bert,
    trainable,
    with_random_biases,
    without_zero_gradients,
    zero_gradient_bias,
)
from kernel_checks import assert_autocast_as_accurate_as_torch

import bitfit_fast
from bitfit_fast.checkpoint import CONFIG_NAME
from bitfit_fast.model import is_applied

COMPILER = "aot_eager"
pytestmark = [
    # Dynamo's note where it graph-breaks in the torch backend's dropout masks (drawn with numpy): expected, see above.
    pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin:UserWarning"),
    # A user's compiled model warns of nothing of ours: dynamo traced through functools.cache (autocast's probe).
    pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`:UserWarning"),
]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.gpu)]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _models(make, backend: str, path: str):
    """Two applied copies of one model: one run as it is, one compiled."""
    torch._dynamo.reset()
    base = make()
    models = [bitfit_fast.apply(copy.deepcopy(base), backend=backend, announce=False, **PATHS[path]).train()
              for _ in range(2)]
    return models[0], models[1], torch.compile(models[1], backend=COMPILER)


@contextlib.contextmanager
def _compiling():
    """Fails unless dynamo compiles a graph within: a silent fallback to eager would make every check pass."""
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    yield
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before, "nothing was compiled"


def _step(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out


def _assert_same_step(eager, compiled_model, compiled, batch) -> None:
    expected, got = _step(eager, batch), _step(compiled, batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(eager, compiled_model)


def _assert_same_gradients(eager, compiled_model) -> None:
    grads = trainable(compiled_model)
    for name, param in trainable(eager).items():
        if zero_gradient_bias(name):
            assert not grads[name].grad.any(), f"{name}: the true gradient is zero, compiled too"
        else:
            scale = param.grad.abs().max().item()
            torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


# Each path once across the three tests (each compile takes 10-20 s on CI's CPU).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused", "modules"])
def test_compiled_model_computes_what_it_does_uncompiled(path, backend):
    eager, compiled_model, compiled = _models(
        lambda: with_random_biases(tiny_bert(), gains=True), backend, path)
    with _compiling():
        for lengths in ((7, 3, 5), (1, 11, 4, 2, 6)):  # a second shape: recompiled, or run with symbolic sizes
            _assert_same_step(eager, compiled_model, compiled, padded_batch(eager, lengths))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused-lean", "fused-minimal"])
def test_compiled_real_minilm_computes_what_it_does_uncompiled(path, backend):
    eager, compiled_model, compiled = _models(lambda: real_minilm(layers=[0, 5], **NO_DROPOUT), backend, path)
    texts = bbc_titles("tech", 2) + bbc_titles("sports", 3)
    with _compiling():
        _assert_same_step(eager, compiled_model, compiled, real_batch(texts, [4, 4, 3, 3, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_real_minilm_under_autocast_computes_what_it_does_uncompiled(precision, backend):
    """Autocast around a compiled model: dynamo traces the casts autocast makes, so the compiled step computes what
    the uncompiled one does under the same autocast (to fp32's rounding: a compiled region left in fp32 would differ
    by the half format's, 1e-3 of the largest value and more) and is as accurate as torch's by the precision rule."""
    eager, compiled_model, compiled = _models(lambda: real_minilm(layers=[0, 5], **NO_DROPOUT), backend, "fused")
    reference = reference_bitfit(real_minilm(layers=[0, 5], **NO_DROPOUT))
    batch = real_batch(bbc_titles("business", 2) + bbc_titles("politics", 3), [0, 0, 4, 4, 4])

    def run(model, dtype):
        model.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(**batch)
        out.loss.backward()
        return {"logits": out.logits.detach().float(), **{n.removeprefix("_orig_mod."): p.grad.clone()
                                                          for n, p in trainable(model).items()}}

    with _compiling():
        got = run(compiled, precision)
    expected = run(eager, precision)
    for name, value in expected.items():
        if zero_gradient_bias(name):
            assert not got[name].any(), f"{name}: the true gradient is zero, compiled too"
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5 * value.abs().max().item(), msg=name)
    same, exact = run(reference, precision), run(reference, None)
    without_zero_gradients(got, same, exact)
    assert_autocast_as_accurate_as_torch(got, same, exact, precision, f"compiled under {precision} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["fused", "fused-minimal"])
def test_compiled_dropout_draws_the_uncompiled_masks_and_stops_recompiling(path, backend):
    """Dropout seeds come from torch's generator in the same order compiled or not, so the same seed gives the same
    masks: the losses and gradients agree exactly as without dropout. Seeds differ every step; after the first
    steps they are symbolic, and a further step compiles nothing new."""
    eager, compiled_model, compiled = _models(
        lambda: with_random_biases(tiny_bert(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)), backend, path)
    batch = padded_batch(eager, (7, 3, 5))
    losses = []
    for step in range(4):
        torch.manual_seed(100 + step)
        expected = _step(eager, batch)
        torch.manual_seed(100 + step)
        with torch.compiler.set_stance("fail_on_recompile" if step == 3 else "default"), \
                (_compiling() if step == 0 else contextlib.nullcontext()):
            got = _step(compiled, batch)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
        _assert_same_gradients(eager, compiled_model)
        losses.append(expected.loss.item())
    assert len(set(losses)) == len(losses), "dropout must be on: each step's seeds, its own loss"


def test_a_compiled_model_saves_loads_and_merges_as_the_model_it_wraps(tmp_path):
    """torch.compile's wrapper names the parameters "_orig_mod.*": saved as such, they loaded onto no base model."""
    base = with_random_biases(tiny_bert())
    model = bitfit_fast.apply(copy.deepcopy(base), backend="torch", announce=False)
    with torch.no_grad():
        for param in trainable(model).values():
            param.normal_()  # trained values, as the compiled model's steps would leave them
    compiled = torch.compile(model, backend=COMPILER)  # lazy: nothing compiles without a forward
    bitfit_fast.save_biases(compiled, tmp_path / "biases")
    record = json.loads((tmp_path / "biases" / CONFIG_NAME).read_text())
    assert record["model_class"] == "BertForSequenceClassification" and set(record["parameters"]) == set(
        trainable(model))
    loaded = bitfit_fast.load_biases(copy.deepcopy(base), tmp_path / "biases")
    other = torch.compile(bitfit_fast.apply(copy.deepcopy(base), backend="torch", announce=False), backend=COMPILER)
    assert bitfit_fast.load_biases(other, tmp_path / "biases") is other
    for target in (loaded, other._orig_mod):
        values = trainable(target)
        assert values.keys() == trainable(model).keys()
        assert all(torch.equal(values[name], param) for name, param in trainable(model).items())
    assert bitfit_fast.merge(compiled) is compiled and not is_applied(model), "the wrapped model merged"
    assert not any(name.startswith("bitfit_fast") for name in vars(model))


def test_a_model_outside_a_task_bank_reads_no_context_variable_and_breaks_no_graph_there():
    """A context variable's read graph-breaks: outside a TaskBank's block the rows' tasks are None without one (a
    12-layer BERT's step had 3 more breaks). Inside, the tasks are read, and the count of open blocks comes back to
    zero after an error too."""
    from bitfit_fast import task_rows

    torch._dynamo.reset()
    model = bitfit_fast.apply(tiny_bert(**NO_DROPOUT), backend="torch", announce=False)
    batch = padded_batch(model)
    explanation = torch._dynamo.explain(lambda b: model(**b).loss)(batch)
    assert explanation.graph_count > 1, "the fused path breaks where it must (the layout's lengths)"
    assert not [reason for reason in explanation.break_reasons
                if any(frame.filename.endswith("task_rows.py") for frame in reason.user_stack)]
    tasks = torch.tensor([1, 0])
    with pytest.raises(KeyError), task_rows.example_tasks(tasks):
        assert torch.equal(task_rows.current(), tasks)
        raise KeyError
    assert task_rows.current() is None and task_rows._open_blocks == 0
