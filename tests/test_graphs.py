"""The CUDA-graph training step (``bitfit_fast.GraphedStep``) and what a capture asks of the fused path: dropout
seeds drawn on the device and read by the kernels from memory, and a token layout that asks the GPU nothing."""

import copy

import pytest
import torch
import transformers.utils.import_utils as hf_import_utils
from bitfit_reference import DEVICE, bbc_titles, padded_batch, real_batch, real_minilm, tiny_bert, trainable

import bitfit_fast
import bitfit_fast_kernels as K
from bitfit_fast import GraphedStep, graphs, unpadding
from bitfit_fast.functions import TORCH, Ops
from bitfit_fast.unpadding import Tokens

MODELS = {"tiny": lambda **options: tiny_bert(**options),
          "minilm": lambda **options: real_minilm(num_labels=3, layers=[0, 5], **options).train()}


def _batch(model_name: str, model) -> dict:
    if model_name == "minilm":  # real text: BBC titles of three classes, padded to the longest
        titles = bbc_titles("business", 2) + bbc_titles("sports", 2) + bbc_titles("tech", 1)
        return real_batch(titles, [0, 0, 1, 1, 2])
    return padded_batch(model, lengths=(7, 3, 5, 1, 6))


@pytest.fixture
def pretend_capturing(monkeypatch):
    """What the fused path and Hugging Face see while a CUDA graph captures, on any device."""
    monkeypatch.setattr(graphs, "capturing", lambda: True)
    monkeypatch.setattr(unpadding, "capturing", lambda: True)
    monkeypatch.setattr(hf_import_utils, "is_cuda_stream_capturing", lambda: True)


def _refuse_host_syncs(monkeypatch):
    """Every way Python asks a tensor for its value (a host sync on a GPU, forbidden while capturing) raises."""
    def sync(*args, **kwargs):
        raise AssertionError("a host sync: a tensor's value was read")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "equal", sync)


@pytest.mark.parametrize("model_name", MODELS)
def test_while_capturing_the_layout_keeps_the_padding_asks_the_gpu_nothing_and_computes_the_same(
        model_name, pretend_capturing, monkeypatch):
    # Attention dropout off: its seed is a host integer (SDPA draws the mask on a GPU); the hidden dropouts' seeds
    # are the kernels', drawn as tensors.
    model = bitfit_fast.apply(MODELS[model_name](hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0),
                              backend="triton", announce=False).train()
    batch = _batch(model_name, model)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}

    valid = batch["attention_mask"].bool()
    tokens = Tokens.of_batch(valid[..., None], valid[:, None, None, :])
    assert tokens.rows is None and tokens.key_mask is not None, "the padding kept, under its mask"
    with monkeypatch.context() as syncs:
        _refuse_host_syncs(syncs)
        run()  # with dropout
        model.eval()  # without, to compare: a row's mask follows its place in the layout, which padding moves
        captured_loss, captured_grads = run()
    monkeypatch.undo()  # eager again: the padding dropped
    assert Tokens.of_batch(valid[..., None], valid[:, None, None, :]).rows is not None
    loss, grads = run()
    torch.testing.assert_close(captured_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(captured_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_name", MODELS)
def test_a_batch_declared_without_padding_is_captured_without_a_mask(model_name, pretend_capturing, monkeypatch):
    # GraphedStep declares a batch whose attention mask is all ones: the all-True mask transformers builds while
    # capturing is dropped, so that attention runs unmasked and the last layer on first tokens, as eagerly.
    model = bitfit_fast.apply(MODELS[model_name](hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                              backend="triton", announce=False).train()
    batch = _batch(model_name, model)
    batch["attention_mask"].fill_(1)
    hidden = torch.zeros(*batch["input_ids"].shape, 4, device=DEVICE)
    all_true = torch.ones(hidden.shape[0], 1, hidden.shape[1], hidden.shape[1], dtype=torch.bool, device=DEVICE)
    assert Tokens.of_batch(hidden, all_true).key_mask is not None, "undeclared, a mask is kept: it may mask"
    seen = []
    of_batch = Tokens.of_batch.__func__
    monkeypatch.setattr(Tokens, "of_batch", classmethod(lambda cls, *args, **kwargs: seen.append(
        of_batch(cls, *args, **kwargs)) or seen[-1]))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}

    with graphs.batch_without_padding(), monkeypatch.context() as syncs:
        assert Tokens.of_batch(hidden, all_true).key_mask is None
        _refuse_host_syncs(syncs)
        captured_loss, captured_grads = run()
    assert seen[-1].key_mask is None and seen[-1].one_sequence_per_row, "unmasked, first tokens only at the end"
    assert not graphs.declared_without_padding(), "the declaration ends with its block"
    monkeypatch.undo()
    loss, grads = run()
    torch.testing.assert_close(captured_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(captured_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_while_capturing_packed_sequences_are_refused(pretend_capturing):
    hidden = torch.zeros(1, 8, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="packed sequences"):
        Tokens.of_batch(hidden, None, cu_seq_lens=torch.tensor([0, 3, 8], device=DEVICE))


def test_the_kernels_dropout_seed_is_a_device_tensor_and_the_torch_ops_an_int(pretend_capturing):
    kernels = Ops(K)
    assert kernels.dropout_seed(0.0, torch.device(DEVICE)) is None
    torch.manual_seed(5)
    seed = kernels.dropout_seed(0.1, torch.device(DEVICE))
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device.type == DEVICE
    torch.manual_seed(5)
    assert torch.equal(kernels.dropout_seed(0.1, torch.device(DEVICE)), seed), "reproducible under manual_seed"
    with pytest.raises(RuntimeError, match="torch backend's dropout .* cannot be captured"):
        TORCH.dropout_seed(0.1, torch.device(DEVICE))


def test_attention_dropout_without_probabilities_refuses_a_capture(pretend_capturing):
    # The torch backend's attention in the lean and minimal modes draws its mask from a host integer.
    model = bitfit_fast.apply(tiny_bert(attention_probs_dropout_prob=0.1), backend="torch", memory="lean",
                              announce=False).train()
    with pytest.raises(RuntimeError, match="attention dropout without its probabilities"):
        model(**padded_batch(model))


def _adamw(model, lr=1e-3, **options):
    return torch.optim.AdamW(trainable(model).values(), lr=lr, **options)


def test_on_cpu_a_graphed_step_is_the_eager_step():
    model = bitfit_fast.apply(tiny_bert(hidden_dropout_prob=0.1).cpu(), backend="torch", announce=False)
    twin = copy.deepcopy(model)
    batches = [{k: v.cpu() for k, v in padded_batch(model).items()} for _ in range(3)]
    step, optimizer = GraphedStep(model, _adamw(model)), _adamw(twin)
    for batch in batches:
        torch.manual_seed(len(batch["labels"]))
        loss = step(batch)
        torch.manual_seed(len(batch["labels"]))
        optimizer.zero_grad(set_to_none=True)
        twin_loss = twin(**batch).loss
        twin_loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable(twin).values()), 1.0)
        optimizer.step()
        assert torch.equal(loss, twin_loss.detach())
    for (name, param), twin_param in zip(trainable(model).items(), trainable(twin).values(), strict=True):
        assert torch.equal(param, twin_param), name


def test_a_graphed_step_takes_adam_and_a_warmup():
    model = tiny_bert()
    with pytest.raises(ValueError, match="Adam or AdamW"):
        GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="at least 1"):
        GraphedStep(model, _adamw(model), warmup=0)


@pytest.mark.gpu
def test_a_graph_needs_a_capturable_optimizer():
    model = bitfit_fast.apply(tiny_bert(), backend="triton", announce=False)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(model, _adamw(model))(padded_batch(model))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_name", MODELS)
def test_graphed_steps_train_as_eager_steps_on_the_same_layout(model_name, precision):
    # Dropout off: then a replay and an eager step compute the same. The eager twin keeps its padding as a graph
    # must (unpadded, its sums would round otherwise), so that after every step the parameters agree closely; the
    # first batch, on which the warmup steps ran before the capture, is trained once.
    model = bitfit_fast.apply(MODELS[model_name](hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                              backend="triton", announce=False).train()
    twin = copy.deepcopy(model)
    twin.bert.encoder.keeps_padding = True
    batches = [_batch(model_name, model) for _ in range(5)]
    batches[2] = {k: v.clone() for k, v in batches[0].items()}  # a batch seen again
    batches[3]["attention_mask"].fill_(1)  # no padding: the graph of the batch without a mask
    batches[4]["attention_mask"].fill_(1)
    step = GraphedStep(model, _adamw(model, capturable=True), autocast=precision)
    twin_step = GraphedStep(twin, _adamw(twin, capturable=True), autocast=precision)
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    for batch in batches:
        loss, twin_loss = step(batch), twin_step._eager(batch)
        torch.testing.assert_close(loss, twin_loss, rtol=1e-4, atol=1e-5)
        for (name, param), twin_param in zip(trainable(model).items(), trainable(twin).values(), strict=True):
            torch.testing.assert_close(param, twin_param, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(start[n], p) for n, p in trainable(model).items()), "the steps trained"
    assert len(step._captures) == 2, "batches of one shape replay one graph, with their mask or without"


@pytest.mark.gpu
def test_each_replay_draws_new_dropout_masks():
    model = bitfit_fast.apply(tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1), backend="triton",
                              announce=False).train()
    batch = padded_batch(model)
    step = GraphedStep(model, _adamw(model, lr=0.0, weight_decay=0.0, capturable=True))  # the model stays as it is
    losses = [step(batch) for _ in range(4)]
    assert len({loss.item() for loss in losses}) == 4, f"each replay its own masks: {losses}"
    model.eval()  # no dropout: the same batch, the same loss
    frozen = GraphedStep(model, _adamw(model, lr=0.0, weight_decay=0.0, capturable=True))
    assert len({frozen(batch).item() for _ in range(3)}) == 1


@pytest.mark.gpu
def test_the_torch_backends_dropout_refuses_a_capture():
    model = bitfit_fast.apply(tiny_bert(hidden_dropout_prob=0.1), backend="torch", announce=False).train()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        GraphedStep(model, _adamw(model, capturable=True))(padded_batch(model))


@pytest.mark.gpu
def test_a_changed_float_learning_rate_is_refused_and_a_tensor_one_is_followed():
    model = bitfit_fast.apply(tiny_bert(), backend="triton", announce=False)
    batch = padded_batch(model)
    optimizer = _adamw(model, capturable=True)
    step = GraphedStep(model, optimizer)
    step(batch)
    optimizer.param_groups[0]["lr"] = 5e-4
    with pytest.raises(ValueError, match="lr=torch.tensor"):
        step(batch)
    scheduled = bitfit_fast.apply(tiny_bert(), backend="triton", announce=False)
    optimizer = _adamw(scheduled, lr=torch.tensor(1e-3, device=DEVICE), capturable=True)
    step = GraphedStep(scheduled, optimizer)
    step(batch)
    optimizer.param_groups[0]["lr"].fill_(0.0)
    before = {n: p.detach().clone() for n, p in trainable(scheduled).items()}
    step(batch)
    for name, param in trainable(scheduled).items():  # AdamW's decoupled decay is lr-scaled too: nothing moves
        assert torch.equal(param, before[name]), name
