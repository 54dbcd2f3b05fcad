"""The fused encoder layer: dropout, saved-tensor accounting, dtype, re-packing, fallbacks."""

import copy
import io
import pickle
import unittest.mock
import warnings

import pytest
import torch
from bitfit_reference import (
    BACKENDS,
    DEVICE,
    assert_same_step_to_the_bit,
    autocast_outputs,
    autocast_step,
    check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards,
    loss_with_seed,
    padded_batch,
    real_minilm,
    reference_bitfit,
    tiny_bert,
    tiny_roberta,
    trainable,
    with_random_biases,
    without_zero_gradients,
)
from kernel_checks import assert_autocast_as_accurate_as_torch
from test_fused_distilbert import tiny_distilbert
from test_fused_modernbert import tiny_modernbert

import bitfit_fast
from bitfit_fast.fused_layer import FusedEncoderLayer
from bitfit_fast.unpadding import Tokens

DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout=0.0)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["default", "lean", "minimal"])
def test_dropout_same_seed_same_result_and_gradient_of_the_computed_forward(backend, memory):
    model = bitfit_fast.apply(tiny_bert(**DROPOUT), backend=backend, memory=memory).train()
    check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards(model, padded_batch(model))


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_dropout_the_memory_modes_compute_the_default_modes_forward_and_gradient(backend):
    """A mode that recomputes (lean: the feed-forward; minimal: also q/k/v and attention, under torch.utils.checkpoint
    with the RNG state replayed) must redraw the forward's masks: with every dropout on, the same seed gives the
    default mode's loss bit for bit, and its gradients to the sums' order. A recomputation that drew a new attention
    mask would pass a finite-difference check at this size (``test_dropout_same_seed...``), not this one."""
    base = with_random_biases(tiny_bert(hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.25), gains=True)
    batch = padded_batch(base, lengths=(7, 1, 5, 7, 3))
    results = {}
    for memory in ("default", "lean", "minimal"):
        model = bitfit_fast.apply(copy.deepcopy(base), backend=backend, memory=memory, announce=False).train()
        loss = loss_with_seed(model, batch, 5)
        results[memory] = loss, dict(zip(trainable(model), torch.autograd.grad(loss, list(trainable(model).values()))))
    default_loss, default_grads = results["default"]
    for memory in ("lean", "minimal"):
        loss, grads = results[memory]
        assert torch.equal(loss, default_loss), memory
        for name, grad in grads.items():
            expected = default_grads[name]
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                       msg=lambda m, name=name, memory=memory: f"{memory} {name}: {m}")


PARTLY_FROZEN = {"bert": (tiny_bert, {"feed-forward only": ["intermediate.dense"], "top layer only": ["layer.1.*"]}),
                 "modernbert": (tiny_modernbert, {"feed-forward only": ["mlp.Wi"], "top layer only": ["layers.1.*"]})}


@pytest.mark.parametrize("family,part", [(family, part) for family, (_, parts) in PARTLY_FROZEN.items()
                                         for part in parts])
@pytest.mark.parametrize("memory", ["lean", "minimal"])
def test_a_memory_mode_recomputes_from_a_frozen_layer_norms_x_hat(family, part, memory):
    """Where only some biases train, a LayerNorm whose own inputs need no gradient (a frozen lower layer) still keeps
    its x_hat: the feed-forward after it (lean) and the next layer's input (minimal) are recomputed from it. Loss and
    gradients are the default mode's."""
    make, parts = PARTLY_FROZEN[family]
    base = make()
    batch = padded_batch(base)
    results = []
    for mode in ("default", memory):
        model = bitfit_fast.apply(copy.deepcopy(base), backend="torch", memory=mode, biases=parts[part],
                                  announce=False)
        loss = loss_with_seed(model, batch, 5)  # the same dropout masks
        results.append((loss, torch.autograd.grad(loss, list(trainable(model).values()))))
    (expected_loss, expected), (loss, grads) = results
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    for grad, expected_grad in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6 * expected_grad.abs().max().item())


# Each family's dropouts: (hidden-state ones, attention probabilities').
DROPOUTS = {"bert": (tiny_bert, ("hidden_dropout_prob", "attention_probs_dropout_prob")),
            "distilbert": (tiny_distilbert, ("dropout", "attention_dropout")),
            "modernbert": (tiny_modernbert, ("mlp_dropout", "attention_dropout"))}


def _logits(model, batch, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", DROPOUTS)
def test_each_dropout_follows_its_own_modules_mode_as_hugging_faces_does(family, backend):
    """Hugging Face's layers drop by each nn.Dropout's own mode, and attention's probabilities by the attention
    module's. Monte Carlo dropout (the model in eval mode, its nn.Dropout modules in training mode) drops the hidden
    states exactly as training does, and not the probabilities; a model in training mode whose dropouts and
    attention modules are in eval mode drops nothing. The fused layers went by the layer's mode alone."""
    make, (hidden, attention) = DROPOUTS[family]
    model = bitfit_fast.apply(make(**{hidden: 0.3, attention: 0.0}), backend=backend, announce=False)
    batch = padded_batch(model)
    batch.pop("labels")
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    trained = _logits(model.train(), batch)
    deterministic = _logits(model.eval(), batch)
    for dropout in dropouts:
        dropout.train()
    assert not torch.equal(trained, deterministic)
    assert torch.equal(_logits(model, batch), trained), "Monte Carlo dropout drops as training does"

    model = bitfit_fast.apply(make(**{hidden: 0.3, attention: 0.3}), backend=backend, announce=False)
    deterministic = _logits(model.eval(), batch)
    model.train()
    for module in [*[m for m in model.modules() if isinstance(m, torch.nn.Dropout)],
                   *[layer.part(layer.spec.attention) for layer in model.modules() if hasattr(layer, "spec")]]:
        module.eval()
    torch.testing.assert_close(_logits(model, batch), deterministic, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("move", ["double", "deepcopy"])
def test_a_forward_under_inference_mode_after_a_move_keeps_the_model_trainable(move):
    """A moved or copied model repacks its q/k/v weights at its next forward; were that forward under
    torch.inference_mode, the packed weight would be an inference tensor, which no later training step could save
    for its backward ("Inference tensors cannot be saved for backward")."""
    model = bitfit_fast.apply(tiny_bert(**NO_DROPOUT), backend="torch", announce=False)
    model = model.double() if move == "double" else copy.deepcopy(model)
    batch = padded_batch(model)
    expected = copy.deepcopy(model)
    with torch.inference_mode():
        model(**batch)
    assert not any(p.is_inference() for p in model.parameters())
    loss, expected_loss = model(**batch).loss, expected(**batch).loss
    grads = torch.autograd.grad(loss, list(trainable(model).values()))
    expected_grads = torch.autograd.grad(expected_loss, list(trainable(expected).values()))
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


def saved_tensors(model, batch) -> dict[int, torch.Tensor]:
    """The tensors that the forward leaves for the backward, parameters excluded, one per distinct storage."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = t
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()  # the graph was complete and usable
    return saved


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages that the forward leaves for the backward, parameters excluded."""
    return sum(t.untyped_storage().nbytes() for t in saved_tensors(model, batch).values())


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta])
def test_saved_bytes_per_memory_mode_against_the_reference(make):
    # Attention dropout off: CPU attention with dropout materialises probabilities for both sides alike.
    layers, lengths = 4, (48, 31, 48, 17)
    base = make(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, num_hidden_layers=layers).train()
    batch = padded_batch(base, lengths=lengths)
    measured = {"reference": saved_bytes(reference_bitfit(base), batch)}
    for mode, options in [("modules", dict(fuse_layers=False)), ("default", {}), ("lean", dict(memory="lean")),
                          ("minimal", dict(memory="minimal"))]:
        measured[mode] = saved_bytes(bitfit_fast.apply(copy.deepcopy(base), backend="torch", **options), batch)
    print("saved bytes vs reference:", {k: round(v / measured["reference"], 3) for k, v in measured.items()})

    hidden, inter, heads = base.config.hidden_size, base.config.intermediate_size, base.config.num_attention_heads
    fp32, int64 = 4, 8
    # Unpadded: every layer but the last runs the real tokens; the last (a sequence-classification head reads
    # the first token) runs one row per sequence, except for its keys and values. Attention lays the real
    # tokens out as [sequences, longest].
    tokens, sequences, longest = sum(lengths), len(lengths), max(lengths)
    rows = (layers - 1) * tokens + sequences
    # lean drops exactly the pre-GELU activation.
    assert measured["default"] - measured["lean"] == rows * inter * fp32
    # minimal also drops q, k, v, the attention output and its logsumexp (the last layer: its first rows' q and
    # output), the one additive key mask and the attention layout's index; it keeps the first layer's input,
    # which no LayerNorm of a fused layer computed.
    padded = sequences * longest
    attention = (layers - 1) * (4 * padded * hidden + padded * heads)
    attention += 2 * padded * hidden + 2 * sequences * hidden + sequences * heads
    kept = padded * fp32 + tokens * int64 - tokens * hidden * fp32
    assert measured["lean"] - measured["minimal"] == attention * fp32 + kept
    assert measured["minimal"] < measured["lean"] < measured["default"] < measured["modules"] <= measured["reference"]


def test_with_attention_dropout_the_lean_torch_path_keeps_no_probability_matrix():
    # SDPA with dropout on CPU keeps the [B, H, T, T] probabilities and mask per layer; the lean fused torch path
    # recomputes them from q, k, v and the row logsumexp.
    base = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_hidden_layers=4).train()
    batch = padded_batch(base, lengths=(48, 31, 48, 17))
    reference = saved_bytes(reference_bitfit(base), batch)
    fused = saved_bytes(bitfit_fast.apply(copy.deepcopy(base), backend="torch", memory="lean"), batch)
    probabilities = 4 * 4 * base.config.num_attention_heads * 48 * 48 * 4  # one fp32 [B, H, T, T] per layer
    assert reference - fused >= probabilities, (reference, fused)
    assert fused <= 0.6 * reference

    def square(model):  # saved tensors [..., T, T]: probabilities or their dropout mask
        return [tuple(t.shape) for t in saved_tensors(model, batch).values() if t.shape[-2:] == (48, 48)]

    assert square(bitfit_fast.apply(copy.deepcopy(base), backend="torch", memory="lean")) == []
    assert square(bitfit_fast.apply(copy.deepcopy(base), backend="torch")), "the default keeps them: seen here"


def test_minimal_mode_rebuilds_a_layer_input_from_the_previous_layer_only_while_it_is_unmodified():
    """In minimal mode a layer's checkpoint keeps the previous layer's x_hat in place of its input, and rebuilds the
    input from it in the backward. An output changed in place after its layer returned (a step of the caller's
    between two ``fused_forward`` calls) is no longer what that x_hat gives: it is kept as it is, and the gradients
    are those of the reference on the changed input."""
    model = with_random_biases(tiny_bert(**NO_DROPOUT)).train()
    reference = reference_bitfit(model).train()
    bitfit_fast.apply(model, backend="torch", memory="minimal", announce=False)
    ours, theirs = model.bert.encoder.layer, reference.bert.encoder.layer
    hidden = torch.randn(3, 6, model.config.hidden_size, device=DEVICE)
    cotangent = torch.randn_like(hidden)
    tokens = Tokens.of_batch(hidden)
    y, _ = ours[0].fused_forward(tokens.pack(hidden), tokens)
    y.mul_(1.5)
    out = tokens.unpack(ours[1].fused_forward(y, tokens)[0])
    (out * cotangent).sum().backward()

    def layer(module, h):
        result = module(h)
        return result[0] if isinstance(result, tuple) else result

    expected = layer(theirs[1], layer(theirs[0], hidden) * 1.5)
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = {name: p.grad for name, p in trainable(model).items() if ".encoder." in name}
    assert len(grads) > 0 and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        truth = reference.get_parameter(name).grad
        torch.testing.assert_close(grad, truth, atol=1e-6 + 1e-4 * truth.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("memory", ["default", "lean", "minimal"])
def test_under_autocast_the_layer_norms_gemm_copies_change_no_bit(memory, monkeypatch):
    """Under autocast the fused LayerNorms write their fp32 output again in the GEMM dtype for the GEMMs that read
    it, and sum that copy's gradient into the stream's as they read it: the Triton path's loss, logits and every
    bias gradient are those of the same step with the casts and autograd's sum as passes of their own, to the bit
    (the CPU interpreter multiplies fp16, not bf16)."""
    model = with_random_biases(tiny_bert(**DROPOUT, num_hidden_layers=3), gains=True).train()
    bitfit_fast.apply(model, backend="triton", memory=memory, announce=False)
    batch = padded_batch(model, (7, 3, 5))
    linear_layer_norm = bitfit_fast.functions.Ops.linear_layer_norm
    copies = []

    def with_copies(on: bool):
        def counted(self, *args, gemm_copy=False, **kwargs):
            out = linear_layer_norm(self, *args, gemm_copy=gemm_copy and on, **kwargs)
            copies.append(out[2] is not None)
            return out
        return counted

    fused = autocast_step(model, batch, monkeypatch, "linear_layer_norm", with_copies(True))
    assert copies == [True] * 5 + [False], "a copy for every LayerNorm but the last one's"  # 2 per layer
    copies.clear()
    plain = autocast_step(model, batch, monkeypatch, "linear_layer_norm", with_copies(False))
    assert not any(copies)
    assert_same_step_to_the_bit(fused, plain)


def test_under_autocast_minimal_mode_keeps_each_layer_input_as_its_gemms_read_it(monkeypatch):
    """Under autocast the residual stream is fp32 and the LayerNorms keep x_hat rounded to the GEMM dtype, which
    rebuilds a layer's input only within that rounding: minimal mode's checkpoint keeps every layer's input in the
    GEMM dtype, exactly what its recomputed GEMMs read (never the fp32 stream itself: the previous layer's copy in
    the GEMM dtype, or the embeddings' cast), so its gradients are lean mode's to the bit (the same attention
    backward; lean keeps q, k, v). Rebuilt from the rounded x_hat, the query biases' gradients had up to 3.5x
    torch's bf16 error (a precision audit)."""
    model = with_random_biases(tiny_bert(**NO_DROPOUT)).train()
    lean = bitfit_fast.apply(copy.deepcopy(model), backend="torch", memory="lean", announce=False)
    bitfit_fast.apply(model, backend="torch", memory="minimal", announce=False)
    kept, checkpointed = [], []  # what the hooks keep in place of a checkpoint's input; each checkpoint's input
    saved_tensors_hooks, checkpoint = torch.autograd.graph.saved_tensors_hooks, torch.utils.checkpoint.checkpoint

    def recording(pack, unpack):
        return saved_tensors_hooks(lambda tensor: kept.append(pack(tensor)) or kept[-1], unpack)

    def recording_checkpoint(function, x, *args, **kwargs):
        checkpointed.append(x)
        return checkpoint(function, x, *args, **kwargs)

    batch = padded_batch(model, (7, 3, 5))
    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd.graph, "saved_tensors_hooks", recording)
        patch.setattr(torch.utils.checkpoint, "checkpoint", recording_checkpoint)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    layers = model.config.num_hidden_layers
    assert len(checkpointed) == layers
    cast = [k for k in kept if isinstance(k, torch.Tensor) and k.shape == (15, model.config.hidden_size)]
    copies = [x for x in checkpointed if x.dtype == torch.bfloat16]
    assert len(cast) + len(copies) == layers and all(k.dtype == torch.bfloat16 for k in cast), "inputs kept in bf16"
    assert not [k for k in kept if isinstance(k, tuple)], "no input rebuilt from a rounded x_hat"
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        lean_loss = lean(**batch).loss
    lean_loss.backward()
    assert torch.equal(loss, lean_loss)
    lean_grads = trainable(lean)
    for name, param in trainable(model).items():
        assert torch.equal(param.grad, lean_grads[name].grad), name


@pytest.mark.parametrize("memory", ["default", "lean", "minimal"])
def test_in_eval_mode_attention_dropout_is_off(memory):
    """A model configured with attention (and hidden) dropout, put in eval mode: the fused torch path drops nothing,
    so its logits are the reference's in eval mode, and the same on every call."""
    model = with_random_biases(tiny_bert(**DROPOUT))
    reference = reference_bitfit(model).eval()
    bitfit_fast.apply(model, backend="torch", memory=memory, announce=False)
    model.eval()
    batch = padded_batch(model)
    with torch.no_grad():
        first, second, expected = model(**batch).logits, model(**batch).logits, reference(**batch).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_predicts_as_no_grad_does(backend):
    """Under torch.inference_mode (whose tensors have no version counter) a padded batch runs the fused layers, the
    q/k/v scatter into attention's layout included, and gives no_grad's logits."""
    model = with_random_biases(tiny_bert())
    bitfit_fast.apply(model, backend=backend, announce=False)
    model.eval()
    batch = padded_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, expected)


def test_dtype_stores_weights_once_in_low_precision_and_merge_restores_the_dtype():
    # Random biases and gains: at Hugging Face's initial values (zero biases, unit gains) the rule's bound was up
    # to 61% of a gradient's largest value.
    model = with_random_biases(tiny_bert(), gains=True)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch", dtype=torch.bfloat16)
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.value.weight.dtype == torch.bfloat16
    assert layer.attention.self.value.bias.dtype == torch.float32, "bias masters stay fp32"
    assert model.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    batch = padded_batch(model, lengths=(31, 17, 5, 31))
    ours, same, exact = autocast_outputs(model, reference, batch, torch.bfloat16)
    without_zero_gradients(ours, same, exact)
    assert all(grad.dtype == torch.float32 for grad in ours.values())
    assert_autocast_as_accurate_as_torch(ours, same, exact, torch.bfloat16, "bf16 weights")
    with pytest.warns(UserWarning, match="rounded"):
        bitfit_fast.merge(model)
    assert model.bert.encoder.layer[0].attention.self.value.weight.dtype == torch.float32


def test_moving_the_model_repacks_qkv_and_stays_correct():
    model = with_random_biases(tiny_bert())
    reference = reference_bitfit(model).double()  # before apply: plain modules, nothing packed
    bitfit_fast.apply(model, backend="torch")
    model.double()  # moves each parameter on its own: the q/k/v views of the packed weight are broken
    batch = padded_batch(model)
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    layer = model.bert.encoder.layer[1]
    packed = layer.packed_qkv_weight()
    assert packed.dtype == torch.float64 and layer.attention.self.query.weight.data_ptr() == packed.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_states_are_captured_and_attention_weights_fall_back_to_the_module_path(backend):
    model = bitfit_fast.apply(tiny_bert(), backend=backend)
    reference = reference_bitfit(model)
    batch = padded_batch(model)
    ours, theirs = model(**batch, output_hidden_states=True), reference(**batch, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sdpa warns that it returns no attention weights
        torch.testing.assert_close(model(**batch, output_attentions=True).logits, theirs.logits, atol=2e-5, rtol=1e-4)


def test_a_head_mask_runs_the_original_forward():
    """transformers 4 passes the encoder a head mask per layer, None for a layer without one: a mask of any head
    takes the module path, which applies it (the fused attention has no head mask); a list of Nones does not."""
    from bitfit_fast.fused_layer import runs_original_forward

    assert not runs_original_forward((), {"head_mask": [None, None]})
    assert runs_original_forward((), {"head_mask": [None, torch.ones(3)]})
    assert runs_original_forward((), {"head_mask": torch.ones(2, 3)})
    assert not runs_original_forward((), {"head_mask": None})


@pytest.mark.gpu
@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta])
def test_gpu_bf16_fused_bert_base_layer_matches_the_reference(make):
    # 128 tokens (RoBERTa's positions start after its padding id); random biases and gains, not HF's initial ones.
    base = with_random_biases(make(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                   num_hidden_layers=2, max_position_embeddings=130), gains=True)
    reference = reference_bitfit(base)
    model = bitfit_fast.apply(copy.deepcopy(base), dtype=torch.bfloat16)
    batch = padded_batch(base, lengths=(128, 77, 128, 5))
    ours, same, exact = autocast_outputs(model, reference, batch, torch.bfloat16)
    without_zero_gradients(ours, same, exact)
    assert_autocast_as_accurate_as_torch(ours, same, exact, torch.bfloat16, f"{make.__name__} BERT-base shape")


def _builders():
    from test_bias_free import tiny_modernbert
    from test_fused_distilbert import tiny_distilbert

    return {"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert, "modernbert": tiny_modernbert}


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-model"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "modernbert"])
@pytest.mark.parametrize("fuse_layers", [True, False], ids=["fused", "modules"])
def test_under_autocast_every_output_has_the_dtype_hugging_faces_has(family, fuse_layers, weights):
    """One autocast policy for both layer paths: each module returns what torch's module would (LayerNorm in fp32
    under CUDA's autocast, in its input's dtype under CPU's: a model cast whole to bf16 returns bf16 there); inside a
    fused block activations stay in the autocast dtype."""
    model = _builders()[family]().to(weights).eval()
    reference = copy.deepcopy(model)
    bitfit_fast.apply(model, backend="torch", fuse_layers=fuse_layers, announce=False)
    input_ids = torch.randint(5, model.config.vocab_size, (3, 7), device=DEVICE)
    mask = torch.ones_like(input_ids)
    mask[1, 4:] = 0
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = model.base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        theirs = reference.base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        last = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        expected_logits = reference(input_ids=input_ids, attention_mask=mask).logits
    assert last.dtype == ours.last_hidden_state.dtype == theirs.last_hidden_state.dtype
    assert [h.dtype for h in ours.hidden_states] == [h.dtype for h in theirs.hidden_states]
    if weights == torch.float32 or DEVICE == "cuda":
        assert last.dtype == torch.float32
    assert logits.dtype == expected_logits.dtype


UNFROZEN = {
    "bert-query": (tiny_bert, "bert.encoder.layer.0.attention.self.query.weight"),  # a view of the packed q/k/v
    "bert-intermediate": (tiny_bert, "bert.encoder.layer.1.intermediate.dense.weight"),
    "bert-layernorm-gain": (tiny_bert, "bert.encoder.layer.0.output.LayerNorm.weight"),
    "modernbert-wqkv": ("modernbert", "model.layers.0.attn.Wqkv.weight"),
    "modernbert-mlp-norm-gain": ("modernbert", "model.layers.1.mlp_norm.weight"),
}


@pytest.mark.parametrize("case", UNFROZEN)
def test_a_weight_unfrozen_after_apply_gets_the_plain_autograd_gradient(case):
    from test_bias_free import plain_reference, tiny_modernbert

    make, name = UNFROZEN[case]
    model = (tiny_modernbert if make == "modernbert" else make)().eval()
    # Plain autograd, every parameter trainable (ModernBERT's with the zero biases apply() adds declared).
    reference = (plain_reference(model) if make == "modernbert" else copy.deepcopy(model)).eval()
    bitfit_fast.apply(model, backend="torch", announce=False)
    model.get_parameter(name).requires_grad_(True)
    batch = padded_batch(model)
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    expected = reference.get_parameter(name).grad
    assert expected.abs().max() > 0
    torch.testing.assert_close(model.get_parameter(name).grad, expected, atol=1e-7, rtol=1e-5)
    for other, param in trainable(model).items():
        torch.testing.assert_close(param.grad, reference.get_parameter(other).grad, atol=1e-7, rtol=1e-5, msg=other)
    layers = [m for m in model.modules() if isinstance(m, FusedEncoderLayer)]
    assert [layer.trains_a_weight() for layer in layers].count(True) == 1, "the layer holding it falls back"
    model.get_parameter(name).requires_grad_(False)  # frozen again: the fused path runs again
    assert not any(layer.trains_a_weight() for layer in layers)


HOOKED = {"bert": ("bert.encoder.layer.1", "attention.output.dense"),
          "distilbert": ("distilbert.transformer.layer.1", "attention.out_lin"),
          "modernbert": ("model.layers.1", "attn.Wo"),
          "real-minilm": ("bert.encoder.layer.1", "attention.output.dense")}


@pytest.mark.parametrize("family", HOOKED)
def test_hooks_inside_the_encoder_fire_and_see_what_hugging_faces_see(family):
    """The fused path runs a layer as one computation, without calling its submodules: a hook on one of them (an
    ablation, a probe) or on a layer makes the encoder run the original forward, which calls them all. Removed,
    the fused path runs again; transformers' own output-capture hooks, idle outside a collector, do not count."""
    from test_fused_modernbert import tiny_modernbert  # every bias declared: the reference has them too

    builders = {**_builders(), "modernbert": tiny_modernbert,
                "real-minilm": lambda: real_minilm(layers=[0, 5], **NO_DROPOUT)}
    model = with_random_biases(builders[family]()).train()
    reference = reference_bitfit(model).train()
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (6, 2, 5))
    layer_path, inner = HOOKED[family]
    seen = {"ours": [], "reference": []}
    handles = []
    for name, m in (("ours", model), ("reference", reference)):
        layer = m.get_submodule(layer_path)
        handles.append(layer.get_submodule(inner).register_forward_pre_hook(lambda module, args: (args[0] * 0.5,)))
        handles.append(layer.register_forward_hook(lambda module, args, out, name=name: seen[name].append(1)))
        handles.append(layer.get_submodule(inner).register_full_backward_hook(
            lambda module, grad_in, grad_out, name=name: seen[name].append(2)))
    fused_calls = []  # the layers that ran fused
    original = type(model.get_submodule(layer_path)).fused_forward
    with unittest.mock.patch.object(type(model.get_submodule(layer_path)), "fused_forward",
                                    lambda self, *a, **k: fused_calls.append(self) or original(self, *a, **k)):
        out, ref = model(**batch), reference(**batch)
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-4)
        out.loss.backward()
        ref.loss.backward()
        assert seen["ours"] == seen["reference"] == [1, 2], seen
        assert model.get_submodule(layer_path) not in fused_calls
        for name, param in trainable(model).items():
            expected = reference.get_parameter(name).grad
            torch.testing.assert_close(param.grad, expected, atol=1e-6 + 1e-4 * expected.abs().max().item(), rtol=0,
                                       msg=name)
        for handle in handles:
            handle.remove()
        model(**batch, output_hidden_states=True)  # transformers 5 leaves idle output-capture hooks behind
        fused_calls.clear()
        model(**batch)
        assert model.get_submodule(layer_path) in fused_calls, "without hooks the fused path runs"


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_a_whole_applied_model_pickles_and_loads_with_torch(family):
    """torch.save of the model object (not its state_dict): the Fused<Class> classes are made at run time, so pickle
    takes each fused module by its mixin and original class and makes the class again where it loads."""
    model = bitfit_fast.apply(with_random_biases(_builders()[family]())).train()
    batch = padded_batch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert loaded.bitfit_fast_config == model.bitfit_fast_config
    for copied in (loaded, pickle.loads(pickle.dumps(model))):
        out, expected = copied(**batch), model(**batch)
        torch.testing.assert_close(out.logits, expected.logits, atol=0, rtol=0)
        out.loss.backward()
        expected.loss.backward()
        for name, param in trainable(copied).items():
            torch.testing.assert_close(param.grad, model.get_parameter(name).grad, atol=0, rtol=0, msg=name)
        model.zero_grad()
