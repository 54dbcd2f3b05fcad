"""The CUDA-graph training step (``bitfit_fast.GraphedStep``) and what a capture asks of the fused path: dropout
seeds drawn on the device and read by the kernels from memory, and a token layout that asks the GPU nothing."""

import contextlib
import copy

import pytest
import torch
import transformers.utils.import_utils as hf_import_utils
from bitfit_reference import DEVICE, bbc_titles, padded_batch, real_batch, real_minilm, tiny_bert, trainable
from test_fused_modernbert import tiny_modernbert

import bitfit_fast
import bitfit_fast_kernels as K
from bitfit_fast import GraphedStep, graphs
from bitfit_fast.functions import TORCH, Ops
from bitfit_fast.fused_modernbert import _pads_between_tokens
from bitfit_fast.task_bank import TaskBank
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
    monkeypatch.setattr(hf_import_utils, "is_cuda_stream_capturing", lambda: True)


def _refuse_host_syncs(monkeypatch):
    """Every way Python asks a tensor for its value (a host sync on a GPU, forbidden while capturing) raises."""
    def sync(*args, **kwargs):
        raise AssertionError("a host sync: a tensor's value was read")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "equal", sync)


def assert_same_gradients(captured: dict, eager: dict) -> None:
    """The captured layout's gradients equal the eager step's (itself checked against the reference elsewhere), each
    to 1e-4 of its own largest value: a query bias's, ~1e-6 here, would pass an absolute tolerance whole."""
    for name, grad in eager.items():
        scale = grad.abs().max().item()  # zero for a bias whose true gradient is zero: then exactly zero
        torch.testing.assert_close(captured[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


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
    assert_same_gradients(captured_grads, grads)


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
        assert Tokens.of_batch(hidden, all_true, mask_is_padding=True).key_mask is None
        assert Tokens.of_batch(hidden, all_true).key_mask is not None, "a mask that may hold a window is kept"
        _refuse_host_syncs(syncs)
        captured_loss, captured_grads = run()
    assert seen[-1].key_mask is None and seen[-1].one_sequence_per_row, "unmasked, first tokens only at the end"
    assert not graphs.declared_without_padding(), "the declaration ends with its block"
    monkeypatch.undo()
    loss, grads = run()
    torch.testing.assert_close(captured_loss, loss, rtol=1e-5, atol=1e-6)
    assert_same_gradients(captured_grads, grads)


@pytest.mark.parametrize("rows", [2, 1])
@pytest.mark.parametrize("path", ["model", "layers"])
def test_a_modernbert_captured_as_unpadded_keeps_its_sliding_window(path, rows, pretend_capturing, monkeypatch):
    # Sequences longer than the window. On the per-layer path (taken with output_hidden_states) Hugging Face's
    # mask of a sliding layer holds the window, not only padding: a declared batch keeps it. A batch of one row
    # is not packed because the encoder fills in position_ids.
    model = bitfit_fast.apply(tiny_modernbert(), backend="triton", announce=False).eval()
    seq = model.config.local_attention + 3
    batch = dict(input_ids=torch.randint(3, model.config.vocab_size, (rows, seq), device=DEVICE),
                 output_hidden_states=path == "layers")
    with graphs.batch_without_padding(), monkeypatch.context() as syncs:
        _refuse_host_syncs(syncs)
        captured = model(**batch).logits
    monkeypatch.undo()
    torch.testing.assert_close(captured, model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_while_capturing_modernbert_does_not_ask_whether_padding_sits_between_tokens(pretend_capturing,
                                                                                       monkeypatch):
    # Padding between real tokens of a row longer than the window sends ModernBERT to its own forward; only the
    # GPU could say: while capturing, a batch not declared free of padding takes that path without asking.
    window = 2
    mask = torch.ones(2, 7, dtype=torch.long, device=DEVICE)
    with monkeypatch.context() as syncs:
        _refuse_host_syncs(syncs)
        assert _pads_between_tokens(mask, window)
        with graphs.batch_without_padding():
            assert not _pads_between_tokens(mask, window)
        assert not _pads_between_tokens(mask[:, :3], window), "a row within the window needs no answer"


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
    for warmup in (0, 1.5, True):
        with pytest.raises(ValueError, match="at least 1"):
            GraphedStep(model, _adamw(model), warmup=warmup)
    for norm in (0, -1.0, "1"):  # 0 would zero every gradient (Hugging Face's Trainer reads it as no clipping)
        with pytest.raises(ValueError, match=r"max_grad_norm bounds the gradients' norm: a positive number, or None "
                                             r"for no clipping; got"):
            GraphedStep(model, _adamw(model), max_grad_norm=norm)
    for dtype in ("bf16", True, torch.int8):
        with pytest.raises(ValueError, match=r"autocast is the dtype of torch.autocast \(torch.bfloat16 or"):
            GraphedStep(model, _adamw(model), autocast=dtype)
    applied = bitfit_fast.apply(tiny_bert().cpu(), backend="torch", announce=False)
    batch = {k: v.cpu() for k, v in padded_batch(applied).items() if k != "labels"}
    with pytest.raises(ValueError, match="the model returned no loss: put the labels in the batch, or give"):
        GraphedStep(applied, _adamw(applied))(batch)


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
    # Padded and unpadded batches of one shape alternate (two graphs in one memory pool, replayed in turn); the
    # last has no mask at all and replays the unpadded graph.
    batches = [_batch(model_name, model) for _ in range(5)]
    batches[2] = {k: v.clone() for k, v in batches[0].items()}  # a batch seen again
    batches[1]["attention_mask"].fill_(1)  # no padding: the graph of the batch without a mask
    batches[3]["attention_mask"].fill_(1)
    del batches[4]["attention_mask"]
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
    for module in model.modules():  # Monte Carlo dropout: eval mode, the dropouts in training mode
        if isinstance(module, torch.nn.Dropout):
            module.train()
    assert len({frozen(batch).item() for _ in range(3)}) == 3, "the dropouts' own modes: a graph of their own"


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


def test_a_step_takes_a_dict_of_tensors_and_returns_its_loss_detached():
    model = bitfit_fast.apply(tiny_bert().cpu(), backend="torch", announce=False)
    step = GraphedStep(model, _adamw(model))
    for batch in ({}, {"input_ids": [[1, 2]]}):
        with pytest.raises(TypeError, match="dict of tensors"):
            step(batch)
    loss = step({k: v.cpu() for k, v in padded_batch(model).items()})
    assert not loss.requires_grad, "a returned loss would keep the step's autograd graph alive"


def test_a_capture_takes_a_capturable_optimizer_and_no_recomputation_under_checkpoint():
    # The checks a capture runs before its warmup (GPU), called directly. torch's Adam refuses a capture unless
    # capturable, fused or not; torch.utils.checkpoint reads the RNG state on the host.
    model = bitfit_fast.apply(tiny_bert(), backend="triton", announce=False)
    for optimizer in (_adamw(model), _adamw(model, fused=True)):
        with pytest.raises(ValueError, match="capturable=True"):
            GraphedStep(model, optimizer)._check_capturable()
    GraphedStep(model, _adamw(model, capturable=True))._check_capturable()
    minimal = bitfit_fast.apply(tiny_bert(), backend="triton", memory="minimal", announce=False)
    with pytest.raises(ValueError, match="memory='minimal' or gradient checkpointing"):
        GraphedStep(minimal, _adamw(minimal, capturable=True))._check_capturable()
    checkpointed = tiny_bert()
    checkpointed.bert.encoder.gradient_checkpointing = True  # what gradient_checkpointing_enable() sets
    with pytest.raises(ValueError, match="memory='minimal' or gradient checkpointing"):
        GraphedStep(checkpointed, _adamw(checkpointed, capturable=True))._check_capturable()


def test_a_graph_of_the_parameters_kept_alive_refuses_a_capture():
    # A loss kept with its graph, or a view of a parameter made with gradients, keeps the parameters' gradient
    # accumulators alive, bound to the stream they were made on: on a GPU a capture on its own stream then fails in
    # CUDA ("operation would make the legacy stream depend on a capturing blocking stream": the task-bank benchmark
    # on the H200, which kept the bank's task_tensors). Refused first, in one line.
    model = bitfit_fast.apply(tiny_bert().cpu(), backend="torch", announce=False)
    step = GraphedStep(model, _adamw(model, capturable=True))
    loss = model(**{k: v.cpu() for k, v in padded_batch(model).items()}).loss
    loss.backward()
    with pytest.raises(ValueError, match=r"keeps an autograd graph of the parameters alive \('bert\."):
        step._check_capturable()
    del loss
    step._check_capturable()
    view = model.classifier.bias[:1]
    with pytest.raises(ValueError, match="'classifier.bias' among them"):
        step._check_capturable()
    with torch.no_grad(), pytest.raises(ValueError, match="'classifier.bias' among them"):  # probed all the same
        step._check_capturable()
    del view
    step._check_capturable()
    # An optimizer over every parameter, the frozen weights too (which it never moves): they have no accumulator.
    GraphedStep(model, torch.optim.AdamW(model.parameters(), capturable=True))._check_capturable()
    bank = _bank("torch")
    tensors = {name: bank.task_tensors(name) for name in bank.tasks}  # detached views: they keep no graph
    GraphedStep(bank, bank.optimizer(lr=1e-3))._check_capturable()
    assert tensors


def test_a_ddp_model_keeps_its_accumulators_alive_by_design_and_is_not_refused(tmp_path):
    # DDP's reducer holds every parameter's AccumulateGrad node; built on a side stream (PyTorch's recipe for CUDA
    # graphs) it captures, so the check leaves it to the capture. A process group of one, on gloo.
    import torch.distributed as dist

    model = bitfit_fast.apply(tiny_bert().cpu(), backend="torch", announce=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert bitfit_fast.graphs._kept_accumulators([p for p in wrapped.parameters() if p.requires_grad])
        GraphedStep(wrapped, _adamw(model, capturable=True))._check_capturable()
    finally:
        dist.destroy_process_group()


def test_restore_puts_back_parameters_and_adam_state_in_place_and_zeroes_state_created_since():
    # What a capture does after its warmup steps (GPU), on CPU: a graph holds the addresses of the parameters and
    # of the optimizer state, so both go back as they were in place; state the warmup created goes back to Adam's
    # initial zeros, state that existed to its values before the warmup.
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    step = GraphedStep(layer, optimizer)
    layer.weight.grad = torch.ones_like(layer.weight)
    optimizer.step()  # the weight has state, the bias none
    before = [p.detach().clone() for p in step.params]
    weight_state = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    snapshot = step._snapshot()
    for _ in range(2):  # the warmup
        layer.weight.grad, layer.bias.grad = torch.randn(2, 3), torch.randn(2)
        optimizer.step()
    tensors = {(i, k): v for i, p in enumerate(step.params) for k, v in optimizer.state[p].items()}
    assert not torch.equal(layer.weight, before[0]) and not torch.equal(layer.bias, before[1])
    pointers = [p.data_ptr() for p in step.params]
    step._restore(snapshot)
    assert [p.data_ptr() for p in step.params] == pointers
    for p, value in zip(step.params, before, strict=True):
        assert torch.equal(p, value)
    assert {(i, k): v for i, p in enumerate(step.params) for k, v in optimizer.state[p].items()} == tensors, \
        "the same tensors, written in place"
    for name, value in optimizer.state[layer.weight].items():
        assert torch.equal(value, weight_state[name]), name
    for name, value in optimizer.state[layer.bias].items():
        assert not value.any(), name


def test_a_graphed_step_on_a_gpu_captures_once_per_signature_and_replays_full_masks_without_them(monkeypatch):
    # GraphedStep.__call__'s dispatch, on CPU with the capture faked: a graph per (keys, shapes, dtypes, devices)
    # whatever the keys' order, and per train/eval mode; a batch with an all-ones mask or none replays the graph of
    # the batch without one, captured declared unpadded; a replay first copies the batch into the graph's inputs,
    # then puts that graph's gradients back on the parameters; a changed float hyperparameter is refused.
    model = tiny_bert()
    optimizer = _adamw(model)
    step = GraphedStep(model, optimizer)
    captured, replayed = [], []

    class Graph:
        def __init__(self, inputs):
            self.inputs = inputs

        def replay(self):
            replayed.append({k: v.clone() for k, v in self.inputs.items()})

    def capture(batch):
        captured.append((sorted(batch), graphs.declared_without_padding()))
        inputs = {k: v.clone() for k, v in batch.items()}
        grads = [torch.full_like(p, len(captured)) for p in step.params]  # each graph's own gradient buffers
        return graphs._Capture(Graph(inputs), inputs, torch.tensor(float(len(captured))), step._settings(), grads,
                               step._addresses())

    keeping = GraphedStep(model, _adamw(model), drop_full_masks=False)
    for graphed in (step, keeping):
        monkeypatch.setattr(graphed, "_capture", capture)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as on a GPU
    ids = torch.arange(8).view(2, 4)
    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    full = torch.ones(2, 4, dtype=torch.long)
    assert step(dict(input_ids=ids, attention_mask=padding)) == 1
    assert captured[-1] == (["attention_mask", "input_ids"], False), "a padded batch keeps its mask"
    assert step(dict(input_ids=ids + 1, attention_mask=full)) == 2
    assert captured[-1] == (["input_ids"], True), "a full mask is dropped, the batch declared unpadded"
    assert not graphs.declared_without_padding()
    loss = step(dict(input_ids=ids + 2))  # no mask: the same graph
    assert loss == 2 and torch.equal(replayed[-1]["input_ids"], ids + 2)
    assert all(torch.equal(p.grad, torch.full_like(p, 2)) for p in step.params), "the replayed graph's gradients"
    step._captures[graphs._signature(dict(input_ids=ids)), step._modes()].loss.fill_(0.0)  # as the next replay would
    assert loss == 2, "the caller's loss is a copy"
    assert step(dict(attention_mask=padding, input_ids=ids + 3)) == 1, "the keys' order does not matter"
    assert torch.equal(replayed[-1]["input_ids"], ids + 3) and torch.equal(replayed[-1]["attention_mask"], padding)
    assert all(torch.equal(p.grad, torch.full_like(p, 1)) for p in step.params)
    step(dict(input_ids=ids.int()))
    step(dict(input_ids=ids[:1]))
    step(dict(token_type_ids=ids))
    assert len(captured) == 5, "a new dtype, shape or key is a new graph"
    model.eval()
    step(dict(input_ids=ids))
    assert len(captured) == 6, "eval mode (no dropout) is a graph of its own"
    model.bert.encoder.layer[0].output.dropout.train()  # Monte Carlo dropout: one dropout drops, in eval mode
    step(dict(input_ids=ids))
    assert len(captured) == 7, "each module's mode: a dropout put back in training mode is a graph of its own"
    assert len(replayed) == 9, "every step replays"
    model.train()
    optimizer.param_groups[0]["lr"] = 5e-4
    with pytest.raises(ValueError, match="lr=torch.tensor"):
        step(dict(input_ids=ids))
    optimizer.param_groups[0]["lr"] = 1e-3
    optimizer.param_groups[0]["weight_decay"] = 0.5
    with pytest.raises(ValueError, match="hyperparameter changed"):
        step(dict(input_ids=ids))
    optimizer.param_groups[0]["weight_decay"] = 1e-2
    step.max_grad_norm = 2.0
    with pytest.raises(ValueError, match="hyperparameter changed"):
        step(dict(input_ids=ids))
    step.max_grad_norm = 1.0
    step(dict(input_ids=ids))
    # A graph writes where the parameters and the optimizer state were when it was captured.
    step.params[0].data = step.params[0].data.clone()
    with pytest.raises(ValueError, match="live elsewhere since the step was captured"):
        step(dict(input_ids=ids))
    keeping(dict(input_ids=ids, attention_mask=full))
    assert captured[-1] == (["attention_mask", "input_ids"], False), "drop_full_masks=False keeps every mask"


def test_the_kernels_dropout_seed_is_drawn_on_the_given_device_afresh_each_time():
    # On a GPU the seed must be drawn there, inside the graph (meta stands in for another device); every mask its
    # own seed, following torch's seed.
    kernels = Ops(K)
    assert kernels.dropout_seed(0.1, torch.device("meta")).device.type == "meta"
    torch.manual_seed(5)
    first, second = kernels.dropout_seed(0.1, torch.device(DEVICE)), kernels.dropout_seed(0.1, torch.device(DEVICE))
    torch.manual_seed(6)
    other = kernels.dropout_seed(0.1, torch.device(DEVICE))
    assert not torch.equal(first, second) and not torch.equal(first, other)


def test_while_capturing_only_a_single_row_with_position_ids_is_refused_as_packed(pretend_capturing):
    # position_ids restarting at 0 mark packed sequences in a batch of one row only; rows of a padded batch may
    # carry them (HF passes them on) and are captured as rows.
    hidden = torch.zeros(1, 8, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="packed sequences"):
        Tokens.of_batch(hidden, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]], device=DEVICE))
    rows = torch.zeros(2, 8, 4, device=DEVICE)
    tokens = Tokens.of_batch(rows, None, position_ids=torch.arange(8, device=DEVICE).expand(2, -1))
    assert tokens.rows is None and tokens.key_mask is None


def test_a_graphed_step_clips_the_gradients_global_norm():
    # The tiny model's gradient norm is below 1 (a clip to 1 changes nothing), and Adam's update hardly sees a
    # rescaled gradient: the gradients the step leaves behind show the clipping.
    model = bitfit_fast.apply(tiny_bert().cpu(), backend="torch", announce=False).eval()
    batch = {k: v.cpu() for k, v in padded_batch(model).items()}
    GraphedStep(model, _adamw(model), max_grad_norm=None)(batch)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable(model).values()]))
    assert norm > 1e-3
    GraphedStep(model, _adamw(model), max_grad_norm=1e-3)(batch)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable(model).values()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)


@pytest.mark.parametrize("fails_in", ["warmup", "capture"])
def test_a_failed_capture_leaves_the_parameters_and_the_optimizer_as_they_were(fails_in, monkeypatch):
    # The capture itself (GPU) faked on CPU. A warmup step fails, or the captured step does (the torch backend's
    # dropout refuses it) and then the capture's end fails too, as after an operation that invalidated it: what
    # the warmup trained is undone, the step's stream is current again, and the step's own error is raised.
    model = bitfit_fast.apply(tiny_bert(hidden_dropout_prob=0.1).cpu(), backend="torch", announce=False).train()
    optimizer = _adamw(model)
    step = GraphedStep(model, optimizer)
    batch = {k: v.cpu() for k, v in padded_batch(model).items()}
    step(batch)  # a real step first: state exists, and must come back as it was
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in trainable(model).items()}
    capturing, streams = [False], []

    class Stream:
        def wait_stream(self, other):
            pass

    main = Stream()

    class Capture:
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            capturing[0] = True
            streams.append("capture")

        def __exit__(self, *exc):
            capturing[0] = False
            if exc[0] is not None:
                raise RuntimeError("operation failed due to a previous error during capture")

    warmups = [0]
    eager = step._eager

    def counted(batch):
        warmups[0] += 1
        if fails_in == "warmup" and warmups[0] == 2:
            raise RuntimeError("CUDA out of memory in the second warmup step")
        return eager(batch)

    monkeypatch.setattr(step, "_eager", counted)
    monkeypatch.setattr(graphs, "capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: main)
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(step, "_check_capturable", lambda: None)  # a CPU AdamW cannot be capturable
    message = "second warmup step" if fails_in == "warmup" else "torch backend's dropout .* cannot be captured"
    with pytest.raises(RuntimeError, match=message):
        step._capture(batch)
    assert streams[-1] is main, "the step's stream is current again"
    for name, param in trainable(model).items():
        assert torch.equal(param, before[name]), name
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, state[name][key]), (name, key)


# A TaskBank's graphed step: mixed batches, the bank's loss, per-task clipping and its optimizer.
BANK_WIDTHS = {"topic": 3, "sentiment": 2, "score": 1}
BANK_SCHEDULE = [["topic", "sentiment", "sentiment", "topic", "score"], ["topic"] * 5,  # "sentiment" absent
                 ["score", "topic", "sentiment", "topic", "sentiment"]]
BANK_LABELS = [2.0, 1.0, 0.0, 0.0, 0.5]  # class ids, and a score for "score"


def _bank(backend: str, device: str = DEVICE, **options):
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **options).to(device)
    return TaskBank.new(model, BANK_WIDTHS, backend=backend).train()


def _bank_batch(bank, tasks: list[str], device: str = DEVICE) -> dict:
    batch = {k: v.to(device) for k, v in padded_batch(bank.model, lengths=(7, 3, 5, 1, 6)).items()}
    labels = torch.tensor(BANK_LABELS, device=device)
    batch["labels"] = torch.where(torch.tensor([t == "score" for t in tasks], device=device), labels, labels.round())
    return batch


def _eager_bank_step(bank, optimizer, batch: dict, tasks, max_grad_norm: float = 1.0) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = bank.loss(bank(tasks, **inputs), batch["labels"], tasks)
    loss.backward()
    bank.clip_grad_norm_(max_grad_norm)
    optimizer.step(tasks)
    return loss.detach()


def test_on_cpu_a_graphed_bank_step_is_the_eager_bank_step():
    bank = _bank("torch", "cpu")
    twin = copy.deepcopy(bank)
    step, optimizer = GraphedStep(bank, bank.optimizer(lr=1e-2), max_grad_norm=0.05), twin.optimizer(lr=1e-2)
    first = next(iter(bank.tasks))
    start = {n: t.detach().clone() for n, t in bank.task_tensors(first).items()}
    for tasks in BANK_SCHEDULE:
        batch = _bank_batch(bank, tasks, "cpu")
        loss = step(batch, tasks)
        assert torch.equal(loss, _eager_bank_step(twin, optimizer, batch, tasks, max_grad_norm=0.05))
    twin_params = dict(twin.named_parameters())
    for name, param in bank.named_parameters():
        assert torch.equal(param, twin_params[name]), name
    moved = [n for n, t in bank.task_tensors(first).items() if not torch.equal(start[n], t)]
    assert "classifier.weight" in moved and len(moved) > len(start) // 2, moved


def test_a_graphed_bank_step_takes_the_banks_optimizer_loss_tasks_and_labels():
    bank = _bank("torch", "cpu")
    with pytest.raises(ValueError, match="bank.optimizer"):
        GraphedStep(bank, torch.optim.AdamW(bank.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="bank.optimizer"):
        GraphedStep(bank, copy.deepcopy(bank).optimizer(lr=1e-3))  # another bank's
    with pytest.raises(ValueError, match="not loss="):
        GraphedStep(bank, bank.optimizer(lr=1e-3), loss=lambda model, batch: 0)
    step = GraphedStep(bank, bank.optimizer(lr=1e-3))
    tasks = BANK_SCHEDULE[0]
    batch = _bank_batch(bank, tasks, "cpu")
    for call in (lambda: step(batch), lambda: step({k: v for k, v in batch.items() if k != "labels"}, tasks),
                 lambda: step({**batch, "tasks": torch.zeros(5, dtype=torch.long)}, tasks)):
        with pytest.raises(TypeError, match=r"step\(batch, tasks\)"):
            call()
    with pytest.raises(ValueError, match="unknown task 'intent'"):
        step(batch, ["intent"] + tasks[1:])
    model = bitfit_fast.apply(tiny_bert().cpu(), backend="torch", announce=False)
    with pytest.raises(TypeError, match="tasks= is a TaskBank's"):
        GraphedStep(model, _adamw(model))({k: v.cpu() for k, v in padded_batch(model).items()}, tasks)


def test_a_graph_takes_a_bank_of_linear_heads_only():
    bank = _bank("triton")
    GraphedStep(bank, bank.optimizer(lr=1e-3))._check_capturable()  # no capturable flag: it decides on the device
    bank.model.classifier.register_buffer("widths", None, persistent=False)  # as heads of another kind have
    with pytest.raises(ValueError, match="not linear layers"):
        GraphedStep(bank, bank.optimizer(lr=1e-3))._check_capturable()


def test_while_capturing_a_bank_step_asks_the_host_nothing_and_trains_as_eagerly(monkeypatch):
    # The step a capture records, run on CPU as it runs then: the task indices unchecked on the device, the optimizer
    # presence made there, the clipping's and optimizer's host-built tensors made by the warmup step (eager) and
    # kept. While capturing the padding stays under its mask, so the twin keeps it too.
    bank = _bank("triton")
    twin = copy.deepcopy(bank)
    twin.model.bert.encoder.keeps_padding = True
    step, optimizer = GraphedStep(bank, bank.optimizer(lr=1e-2), max_grad_norm=0.05), twin.optimizer(lr=1e-2)
    for index, tasks in enumerate(BANK_SCHEDULE):
        batch = _bank_batch(bank, tasks)
        with monkeypatch.context() as capture:
            if index:  # the first step is the warmup
                capture.setattr(graphs, "capturing", lambda: True)
                capture.setattr(hf_import_utils, "is_cuda_stream_capturing", lambda: True)
                _refuse_host_syncs(capture)
            loss = step._eager({**batch, "tasks": bank.task_index(tasks).to(DEVICE)})  # as GraphedStep gives them
        twin_loss = _eager_bank_step(twin, optimizer, batch, tasks, max_grad_norm=0.05)
        torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
    twin_params = dict(twin.named_parameters())
    for name, param in bank.named_parameters():
        torch.testing.assert_close(param, twin_params[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_graphed_bank_steps_train_as_eager_bank_steps(precision):
    # One graph for every mix of tasks (a task absent from one batch stays where it was), against the eager steps
    # of a twin that keeps its padding, as the graph must.
    bank = _bank("triton")
    twin = copy.deepcopy(bank)
    twin.model.bert.encoder.keeps_padding = True
    step = GraphedStep(bank, bank.optimizer(lr=1e-2), max_grad_norm=0.05, autocast=precision)
    twin_step = GraphedStep(twin, twin.optimizer(lr=1e-2), max_grad_norm=0.05, autocast=precision)
    for tasks in BANK_SCHEDULE:
        batch = _bank_batch(bank, tasks)
        loss, twin_loss = step(batch, tasks), twin_step._eager({**batch, "tasks": twin.task_index(tasks, DEVICE)})
        torch.testing.assert_close(loss, twin_loss, rtol=1e-4, atol=1e-5)
        twin_params = dict(twin.named_parameters())
        for name, param in bank.named_parameters():
            torch.testing.assert_close(param, twin_params[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(step._captures) == 1, "every mix of tasks replays one graph"
