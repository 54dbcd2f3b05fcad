"""The fused ModernBERT layer and its unpadded stack against reference BitFit on config-built ModernBERT: pre-LayerNorm,
RoPE, alternating global and sliding-window attention, GeGLU; uneven padding; both backends; dropout; fallbacks;
a ModernBERT checkpoint on disk trained, saved and reloaded; the classification shortcut (classifier_pooling="cls")."""

import copy

import pytest
import torch
import transformers
from bitfit_reference import (
    AUTOCAST_DTYPE,
    DEVICE,
    PATHS,
    adamw_steps,
    assert_gradients_match,
    assert_same_step_to_the_bit,
    autocast_outputs,
    autocast_step,
    check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards,
    enable_hf_checkpointing,
    padded_batch,
    reference_bitfit,
    returned_states,
    trainable,
    with_random_biases,
)
from kernel_checks import assert_autocast_as_accurate_as_torch, assert_gemms_ran_in

import bitfit_fast
from bitfit_fast import fused_modernbert, torch_ops
from bitfit_fast.fused_layer import unfuse_hooks
from bitfit_fast.fused_modernbert import FusedPreNormEncoder, FusedPreNormLayer

# Hidden 36 over 3 heads (head dim 12), GLU width 44, 3 layers: global, sliding, global attention. The window is 2
# tokens either side (local_attention 4), shorter than the sequences below.
TINY_MODERNBERT = dict(
    vocab_size=97, hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=44,
    max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, cls_token_id=1, sep_token_id=2, attn_implementation="sdpa", num_labels=3,
)
BIAS_FLAGS = dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True)
LENGTHS = [(11, 4, 8), (3, 9), (10, 6)]
TOL = dict(atol=2e-5, rtol=1e-4)


def tiny_modernbert(**overrides) -> transformers.ModernBertForSequenceClassification:
    """A ModernBERT whose config declares every bias, each random (so its value matters), with random LayerNorm
    gains, some near zero as pretrained."""
    config = transformers.ModernBertConfig(**{**TINY_MODERNBERT, **BIAS_FLAGS, **overrides})
    return with_random_biases(transformers.ModernBertForSequenceClassification(config), gains=True)


def assert_fused(model) -> None:
    assert isinstance(model.model, FusedPreNormEncoder)
    assert all(isinstance(layer, FusedPreNormLayer) for layer in model.model.layers)


def assert_same_gradients(model, reference) -> None:
    assert_gradients_match(model, reference)  # each relative to its own scale: mlp_norm.bias's is ~3e-5



@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_the_rotation_is_hugging_faces_in_fp32_and_exact_in_float64(dtype):
    """rotate() on rows [N, heads·head_dim] against apply_rotary_pos_emb on [1, heads, N, head_dim]: bit-equal for
    half precision and fp32 (both rotate in fp32). Hugging Face rotates a float64 model in fp32 too, so its float64
    reference hides a rotation rounded through fp32 (1e-8): there, against the formula in float64 (3 roundings)."""
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    torch.manual_seed(0)
    rows, heads, head_dim = 7, 3, 10
    x = (torch.randn(rows, heads * head_dim, dtype=torch.float64) * 30).to(dtype)
    angles = torch.rand(rows, head_dim // 2, dtype=torch.float64) * 100
    cos, sin = (f(torch.cat((angles, angles), dim=-1)).to(torch.promote_types(dtype, torch.float32))
                for f in (torch.cos, torch.sin))
    ours = fused_modernbert.rotate(x, cos, sin, heads)
    by_head = x.view(1, rows, heads, head_dim).transpose(1, 2)
    if dtype == torch.float64:
        half = head_dim // 2
        expected = by_head * cos + torch.cat((-by_head[..., half:], by_head[..., :half]), dim=-1) * sin
    else:
        expected = apply_rotary_pos_emb(by_head, by_head, cos[None], sin[None])[0]
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected.transpose(1, 2).reshape(rows, -1), rtol=0, atol=0)


def test_the_tiny_config_exercises_both_attention_types_and_the_window():
    model = tiny_modernbert()
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    wide = copy.deepcopy(model)
    wide.config.local_attention = 64
    batch = padded_batch(model, LENGTHS[0])
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, wide(**batch).logits, atol=1e-5), "the window matters"


def apply_path(model, backend: str, path: str) -> None:
    """bitfit_fast.apply on a path of PATHS: the fused layers in a memory mode, or the module path."""
    bitfit_fast.apply(model, backend=backend, **PATHS[path])
    if path == "modules":
        assert not any(isinstance(m, (FusedPreNormEncoder, FusedPreNormLayer)) for m in model.modules())
    else:
        assert_fused(model)


@pytest.mark.parametrize("backend,path,attention", [
    *[(backend, path, "one call") for backend in ("torch", "triton") for path in PATHS],
    ("torch", "fused", "length groups"), ("triton", "fused-lean", "length groups")])
def test_logits_gradients_and_adamw_steps_match_reference_bitfit(backend, path, attention, request):
    """In one attention call and by length groups (each cut to its longest, the sliding window's mask with it)."""
    if attention == "length groups":
        request.getfixturevalue("grouped_attention")
    model = tiny_modernbert()
    reference = reference_bitfit(model)
    apply_path(model, backend, path)
    assert trainable(model).keys() == trainable(reference).keys()

    batch = padded_batch(model, LENGTHS[0])
    out, ref_out = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    assert_same_gradients(model, reference)

    batches = [padded_batch(model, lengths) for lengths in LENGTHS[1:]]
    assert adamw_steps(model, batches) == pytest.approx(adamw_steps(reference, batches), rel=1e-4, abs=1e-5)
    expected = dict(reference.named_parameters())
    for name, param in bitfit_fast.merge(model).named_parameters():
        torch.testing.assert_close(param, expected[name], **TOL, msg=name)


# Triton's interpreter cannot run a bf16 tl.dot: bf16 on Triton runs on a GPU only.
AUTOCAST_CASES = [pytest.param(precision, path, backend,
                               id=f"{str(precision).removeprefix('torch.')}-{path}-{backend}",
                               marks=[pytest.mark.gpu] if (precision, backend) == (torch.bfloat16, "triton") else [])
                  for precision in (torch.float16, torch.bfloat16) for path in PATHS for backend in ("torch", "triton")]


@pytest.mark.parametrize("precision,path,backend", AUTOCAST_CASES)
def test_autocast_is_as_accurate_as_torch_at_the_same_precision(precision, path, backend, gemm_dtypes):
    # The residual stream stays fp32 (as in Hugging Face's forward under autocast); the GEMMs run in fp16/bf16.
    # flash-attention's rule (kernel_checks), against the fp32 reference, with a slack relative to each tensor: the
    # gradients here are small (Wqkv's 2.6e-3, Wi's 2.4e-4, a norm bias's 3e-5), and a flat atol of 5e-3 against the
    # reference under the same autocast let a zeroed GeGLU bias gradient pass.
    model = tiny_modernbert()
    reference = reference_bitfit(model)
    apply_path(model, backend, path)
    batch = padded_batch(model, LENGTHS[0])

    ours, same, exact = autocast_outputs(model, reference, batch, precision)
    assert_gemms_ran_in(precision, gemm_dtypes)
    assert all(ours[name].dtype == torch.float32 for name in trainable(model))
    assert all(exact[name].abs().max() > 0 for name in exact)
    assert_autocast_as_accurate_as_torch(ours, same, exact, precision, f"ModernBERT {path} on {backend}")


@pytest.mark.parametrize("memory", ["default", "lean", "minimal"])
def test_under_autocast_the_pre_norms_write_the_gemm_dtype_and_change_no_bit(memory, monkeypatch):
    """Under autocast a pre-norm LayerNorm's output, which only GEMMs read, comes in the GEMM dtype and its gradient
    is read so: the Triton path's loss, logits and bias gradients are those of the same step with an fp32 output
    and the casts as passes of their own, to the bit (the CPU interpreter multiplies fp16, not bf16)."""
    model = tiny_modernbert(mlp_dropout=0.1).train()
    bitfit_fast.apply(model, backend="triton", memory=memory, announce=False)
    batch = padded_batch(model, LENGTHS[0])
    layer_norm = bitfit_fast.functions.Ops.layer_norm
    out_dtypes = []

    def in_gemm_dtype(on: bool):
        def recorded(self, *args, out_dtype=None, **kwargs):
            out_dtypes.append(out_dtype)
            return layer_norm(self, *args, out_dtype=out_dtype if on else None, **kwargs)
        return recorded

    fused = autocast_step(model, batch, monkeypatch, "layer_norm", in_gemm_dtype(True))
    # Two norms a layer (the first layer has no attention norm); the embeddings' and the final norm are modules.
    assert out_dtypes.count(AUTOCAST_DTYPE) == 5 and out_dtypes.count(None) == len(out_dtypes) - 5
    plain = autocast_step(model, batch, monkeypatch, "layer_norm", in_gemm_dtype(False))
    assert_same_step_to_the_bit(fused, plain)


@pytest.mark.parametrize("biases", ["all", "subset"])
def test_bias_free_modernbert_is_fused_with_its_added_biases(biases):
    # The default ModernBERT has no bias: apply adds zero ones (all: every Linear and LayerNorm; subset: Wqkv, whose
    # query rows train, and Wi) and the layers fuse, bias-free LayerNorms and linears included.
    config = transformers.ModernBertConfig(**TINY_MODERNBERT)
    model = transformers.ModernBertForSequenceClassification(config).to(DEVICE)
    reference = transformers.ModernBertForSequenceClassification(
        transformers.ModernBertConfig(**TINY_MODERNBERT, **BIAS_FLAGS)).to(DEVICE)
    missing = reference.load_state_dict(model.state_dict(), strict=False).missing_keys
    with torch.no_grad():
        for name in missing:
            reference.get_parameter(name).zero_()
    reference = reference_bitfit(reference)
    bitfit_fast.apply(model, biases=biases, backend="torch", announce=False)
    assert_fused(model)
    batch = padded_batch(model, LENGTHS[0])
    out, ref_out = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, **TOL)
    out.loss.backward()
    ref_out.loss.backward()
    expected = dict(reference.named_parameters())
    for name, param in trainable(model).items():
        grad = expected[name].grad
        if biases == "subset" and name.endswith("attn.Wqkv.bias"):  # key and value rows: exactly zero
            grad = torch.cat([grad[:36], torch.zeros_like(grad[36:])])
        torch.testing.assert_close(param.grad, grad, **TOL, msg=name)


def test_dropout_same_seed_same_result_and_gradient_of_the_computed_forward():
    # Torch backend; the Triton GeGLU epilogue's dropout is checked against torch on its mask in test_kernels_linear.
    model = bitfit_fast.apply(tiny_modernbert(attention_dropout=0.1, mlp_dropout=0.1), backend="torch").train()
    check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards(model, padded_batch(model, LENGTHS[0]))


def test_hugging_faces_stack_forward_runs_the_layers_fused_one_at_a_time_on_its_masks():
    # What runs whenever the fused stack falls back: ModernBertModel's own forward, which builds a 4-D mask per
    # attention type (the window included) and calls each fused layer with it.
    model = bitfit_fast.apply(tiny_modernbert(), backend="torch")
    reference = reference_bitfit(model)
    batch = padded_batch(model, LENGTHS[0])
    calls = []
    model.model.layers[1].register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ours = type(model.model).original_class.forward(model.model, **inputs).last_hidden_state
    theirs = reference.model(**inputs).last_hidden_state
    assert calls == [batch["input_ids"].shape + (36,)], "the sliding layer ran on its own"
    real = batch["attention_mask"].bool()  # padding rows: zeros from the fused layers, whatever from Hugging Face
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    ours.sum().backward()
    assert all(p.grad is not None for n, p in trainable(model).items() if n.startswith("model.layers"))


@pytest.mark.parametrize("rows", ["exact", "bucketed"])
def test_packed_sequences_match_the_padded_batch(rows, request):
    if rows == "bucketed":
        request.getfixturevalue("bucketed_rows")
    # DataCollatorWithFlattening's layout: one row, position ids restarting at 0; each sequence attends to itself.
    model = bitfit_fast.apply(tiny_modernbert(), backend="torch").eval()
    batch = padded_batch(model, LENGTHS[0])
    real = batch["attention_mask"].bool()
    packed_ids = batch["input_ids"][real].unsqueeze(0)
    positions = torch.cat([torch.arange(n, device=DEVICE) for n in LENGTHS[0]]).unsqueeze(0)
    with torch.no_grad():
        padded = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        packed = model.model(input_ids=packed_ids, position_ids=positions).last_hidden_state
    torch.testing.assert_close(packed[0], padded[real], **TOL)


def test_a_checkpoint_on_disk_trains_saves_and_reloads_its_biases(tmp_path):
    # What the trainer does with --model DIR: from_pretrained, apply, steps, save_biases; then a fresh base loads them.
    transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(**TINY_MODERNBERT)).save_pretrained(
        tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").to(DEVICE)
    bitfit_fast.apply(model)
    assert_fused(model)
    batches = [padded_batch(model, lengths) for lengths in LENGTHS[1:]]
    adamw_steps(model, batches)
    added = model.bitfit_fast_state.added_biases
    assert all(model.get_submodule(name).bias.abs().max() > 0 for name in added), "the added biases trained"
    bitfit_fast.save_biases(model, tmp_path / "biases")

    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").to(DEVICE)
    bitfit_fast.load_biases(fresh, tmp_path / "biases", backend="torch")
    assert_fused(fresh)
    batch = padded_batch(model, LENGTHS[0])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, model.eval()(**batch).logits, atol=0, rtol=0)


# ------------------------------------------------------------------ the classification shortcut (pooling "cls")


def record_last_layer(model) -> list[bool]:
    """The ``first_only`` of every call of the last layer's fused_forward (the instance's, wrapped)."""
    layer = model.model.layers[-1]
    calls, fused_forward = [], layer.fused_forward

    def recording(x, rows, first_only=False):
        calls.append(first_only)
        return fused_forward(x, rows, first_only)

    layer.fused_forward = recording
    return calls


def encoder_rows(model, batch, **kwargs):
    """The model's output on ``batch``, and how many positions per sequence its ModernBertModel returned (1 when
    the shortcut ran)."""
    out, shape = returned_states(model.model, model, batch, **kwargs)
    assert shape[0] == batch["input_ids"].shape[0]
    return out, shape[1]


def gradients(loss, model) -> dict:
    params = trainable(model)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_close_gradients(grads, expected, rel: float = 1e-4) -> None:
    """Each gradient to ``rel`` of its own largest value (``bitfit_reference.assert_gradients_match``'s rule, on
    gradients already taken)."""
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, expected[name], atol=rel * scale, rtol=rel,
                                   msg=lambda m, n=name: f"{n}: {m}")


# Layers: 3 (global, sliding, global: the last one global) or 2 (global, sliding: the last one sliding, its window
# shorter than the longer sequences). Batches: uneven padding, a one-token sequence, no padding at all.
SHORTCUT_LENGTHS = [(11, 4, 8), (1, 9, 6), (7, 7)]


@pytest.mark.parametrize("backend,memory,layers,attention", [
    ("torch", "default", 3, "one call"), ("torch", "default", 2, "one call"), ("torch", "minimal", 3, "one call"),
    ("torch", "minimal", 2, "one call"), ("triton", "default", 2, "one call"), ("torch", "default", 2, "length groups"),
    ("triton", "default", 2, "length groups")])
def test_cls_pooling_runs_the_last_layer_for_first_tokens_with_the_same_logits_loss_and_gradients(
        backend, memory, layers, attention, request):
    if attention == "length groups":
        request.getfixturevalue("grouped_attention")
    model = tiny_modernbert(num_hidden_layers=layers)
    assert model.config.classifier_pooling == "cls", "Hugging Face's default"
    assert model.config.layer_types[-1] == ("sliding_attention" if layers == 2 else "full_attention")
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend, memory=memory)
    shortcut_off = copy.deepcopy(model)
    unfuse_hooks(shortcut_off)  # the encoder's first_token_only is never turned on
    calls, off_calls = record_last_layer(model), record_last_layer(shortcut_off)
    for lengths in SHORTCUT_LENGTHS:
        batch = padded_batch(model, lengths)
        out, rows = encoder_rows(model, batch)
        off, off_rows = encoder_rows(shortcut_off, batch)
        ref = reference(**batch)
        assert (rows, off_rows) == (1, max(lengths)), "the shortcut returns [B, 1, d]; without it, every token"
        assert (calls, off_calls) == ([True], [False])
        calls.clear()
        off_calls.clear()
        torch.testing.assert_close(out.logits, off.logits, **TOL)
        torch.testing.assert_close(out.logits, ref.logits, **TOL)
        torch.testing.assert_close(out.loss, off.loss, **TOL)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        grads = gradients(out.loss, model)
        assert_close_gradients(grads, gradients(off.loss, shortcut_off))
        assert_close_gradients(grads, gradients(ref.loss, reference))


def test_mean_pooling_reads_every_token_and_keeps_the_shortcut_off():
    model = tiny_modernbert(classifier_pooling="mean")
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    calls = record_last_layer(model)
    batch = padded_batch(model, LENGTHS[0])
    out, rows = encoder_rows(model, batch)
    ref = reference(**batch)
    assert (rows, calls) == (11, [False])
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    assert_close_gradients(gradients(out.loss, model), gradients(ref.loss, reference))
    # The pooling is read from the config at every forward.
    model.config.classifier_pooling = reference.config.classifier_pooling = "cls"
    out, rows = encoder_rows(model, batch)
    assert (rows, calls[1:]) == (1, [True])
    with torch.no_grad():
        torch.testing.assert_close(out.logits, reference(**batch).logits, **TOL)


def test_hidden_states_turn_the_shortcut_off_and_stay_exact():
    model = tiny_modernbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    calls = record_last_layer(model)
    batch = padded_batch(model, LENGTHS[0])
    valid = batch["attention_mask"].bool()
    out, rows = encoder_rows(model, batch, output_hidden_states=True)
    ref = reference(**batch, output_hidden_states=True)
    assert (rows, calls) == (11, [False])
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours[valid], theirs[valid], **TOL)  # padding positions are zeros here
    assert_close_gradients(gradients(out.loss, model), gradients(ref.loss, reference))
    model.config.output_hidden_states = True
    calls.clear()
    assert encoder_rows(model, batch)[1] == 11 and calls == [False]
    model.config.output_hidden_states = False
    assert encoder_rows(model, batch)[1] == 1 and calls[1:] == [True]


def test_a_tuple_return_and_a_tanh_gelu_answer_as_hugging_face_does():
    """return_dict=False asks the stack for Hugging Face's tuple; a tanh GELU is not the fused layers' exact one, so
    its layers keep their own forward."""
    model = tiny_modernbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, LENGTHS[0])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)
    ours, theirs = model.model(**inputs), reference.model(**inputs)
    assert type(ours) is tuple and type(theirs) is tuple
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[0][valid], theirs[0][valid], **TOL)

    tanh = tiny_modernbert(hidden_activation="gelu_pytorch_tanh")
    reference = reference_bitfit(tanh)
    bitfit_fast.apply(tanh, backend="torch")
    assert not any(isinstance(layer, FusedPreNormLayer) for layer in tanh.model.layers)
    torch.testing.assert_close(tanh(**batch).logits, reference(**batch).logits, **TOL)


def test_the_shortcut_under_gradient_checkpointing_gives_the_reference_logits_and_gradients():
    """Hugging Face's activation checkpointing on every layer: the stack checkpoints each fused layer, the last one
    for each sequence's first row (run again in the backward, for first rows again)."""
    for layers, memory in ((2, "default"), (3, "minimal")):  # the last layer sliding, then global
        model = tiny_modernbert(num_hidden_layers=layers)
        reference = reference_bitfit(model).train()
        bitfit_fast.apply(model, backend="torch", memory=memory)
        enable_hf_checkpointing(model)
        model.train()
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        calls = record_last_layer(model)
        for lengths in SHORTCUT_LENGTHS:
            batch = padded_batch(model, lengths)
            out, rows = encoder_rows(model, batch)
            ref = reference(**batch)
            assert rows == 1, "the shortcut returns [B, 1, d]"
            torch.testing.assert_close(out.logits, ref.logits, **TOL)
            torch.testing.assert_close(out.loss, ref.loss, **TOL)
            assert_close_gradients(gradients(out.loss, model), gradients(ref.loss, reference))
            assert calls == [True, True], "first rows in the forward, and again in the checkpoint's recomputation"
            calls.clear()


QUESTION_ANSWERING_OR_TOKENS = {
    "question-answering": transformers.ModernBertForQuestionAnswering,
    "token": transformers.ModernBertForTokenClassification,
}


@pytest.mark.parametrize("head", QUESTION_ANSWERING_OR_TOKENS)
@pytest.mark.parametrize("hidden_states", [False, True], ids=["logits", "hidden-states"])
def test_heads_reading_every_token_get_every_hidden_state_and_logit_of_the_reference(head, hidden_states):
    """No shortcut for a head that reads every token, with or without hidden states asked for. Question answering's
    loss reads the padding positions (a softmax over every position): every position of every hidden state and of
    the logits is the reference's; a token classifier's real positions are."""
    config = transformers.ModernBertConfig(**{**TINY_MODERNBERT, **BIAS_FLAGS, "num_labels": 2})
    model = with_random_biases(QUESTION_ANSWERING_OR_TOKENS[head](config)).train()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    calls = record_last_layer(model)
    batch = padded_batch(model, (9, 2, 6), num_labels=2)
    valid = batch["attention_mask"].bool()
    if head == "question-answering":
        del batch["labels"]
        batch.update(start_positions=torch.tensor([1, 0, 3], device=DEVICE),
                     end_positions=torch.tensor([4, 1, 5], device=DEVICE))
        logits, compared = ("start_logits", "end_logits"), torch.ones_like(valid)
    else:
        batch["labels"] = torch.randint(0, 2, valid.shape, device=DEVICE).masked_fill(~valid, -100)
        logits, compared = ("logits",), valid
    out, rows = encoder_rows(model, batch, output_hidden_states=hidden_states)
    ref = reference(**batch, output_hidden_states=hidden_states)
    assert rows == 9 and calls == [False], "every token, in the last layer too"
    for key in logits:
        assert out[key].shape == ref[key].shape
        torch.testing.assert_close(out[key][compared], ref[key][compared], **TOL)
    if hidden_states:
        assert len(out.hidden_states) == len(ref.hidden_states) == 4
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours[compared], theirs[compared], **TOL)
    else:
        assert out.hidden_states is None
    grads, expected = gradients(out.loss, model), gradients(ref.loss, reference)
    largest = max(g.abs().max().item() for g in expected.values())
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        if scale < 1e-6 * largest:  # question answering: a bias shifting every position's logit alike
            assert grad.abs().max() < 1e-6 * largest, name
        else:
            torch.testing.assert_close(grad, expected[name], atol=1e-4 * scale, rtol=0, msg=name)


def packed_row(model, lengths, given: str) -> tuple[dict, dict]:
    """Sequences as a padded batch and as one packed row (DataCollatorWithFlattening's layout) with position ids
    restarting at 0 ("position_ids"), flash attention's cu_seq_lens without them ("cu_seq_lens"), or both."""
    padded = padded_batch(model, lengths)
    features = [dict(input_ids=padded["input_ids"][row, :length].tolist()) for row, length in enumerate(lengths)]
    collator = transformers.DataCollatorWithFlattening(return_tensors="pt", return_position_ids=given != "cu_seq_lens",
                                                       return_flash_attn_kwargs=given != "position_ids")
    packed = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in collator(features).items()
              if k != "labels"}  # the collator's language-modelling labels
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert ("position_ids" in packed) == (given != "cu_seq_lens") and ("cu_seq_lens_q" in packed) == (
        given != "position_ids")
    return padded, packed


@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens", "both"])
def test_a_packed_row_is_classified_as_the_reference_classifies_its_first_sequence(given):
    """A sequence classifier on a packed row reads the row's first token: the first sequence's (whose attention, per
    sequence, sees none of the others). Several sequences in the row: no shortcut (it would read each sequence's
    first row); one sequence: the shortcut."""
    model = tiny_modernbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    calls = record_last_layer(model)
    for lengths in ((6, 3, 9), (7,)):
        padded, packed = packed_row(model, lengths, given)
        labels = padded["labels"][:1]
        out, rows = encoder_rows(model, dict(packed, labels=labels))
        ref = reference(input_ids=padded["input_ids"][:1, :lengths[0]], labels=labels)
        shortcut = len(lengths) == 1
        assert (rows, calls) == ((1, [True]) if shortcut else (sum(lengths), [False]))
        calls.clear()
        torch.testing.assert_close(out.logits, ref.logits, **TOL)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        assert_close_gradients(gradients(out.loss, model), gradients(ref.loss, reference))


@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens", "both"])
def test_a_packed_row_of_token_labels_equals_the_reference_on_the_padded_batch(given):
    """Every token of a packed row, from position ids, from cu_seq_lens alone (no position ids: the rotary positions
    of the row, whose differences within each sequence are those of positions from 0), or both."""
    config = transformers.ModernBertConfig(**{**TINY_MODERNBERT, **BIAS_FLAGS})
    model = with_random_biases(transformers.ModernBertForTokenClassification(config))
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    lengths = (5, 1, 8, 3)  # some longer than the window
    padded, packed = packed_row(model, lengths, given)
    valid = padded["attention_mask"].bool()
    labels = torch.randint(0, 3, valid.shape, device=DEVICE).masked_fill(~valid, -100)
    out = model(**packed, labels=labels[valid].unsqueeze(0))
    ref = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels)
    torch.testing.assert_close(out.logits[0], ref.logits[valid], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert_close_gradients(gradients(out.loss, model), gradients(ref.loss, reference))


WINDOW_CASES = [(length, layout) for length in (2, 3, 4, 5, 6) for layout in ("one call", "length groups", "inside")
                if layout != "inside" or length >= 3]


@pytest.mark.parametrize("length,layout", WINDOW_CASES)
def test_sequences_about_as_long_as_the_sliding_window_keep_it(length, layout, request):
    """ModernBERT's window (local_attention 4: each query sees the keys at most sliding_window = 2 positions away)
    masks nothing in a sequence of up to 3 tokens, and from 4 tokens on it does: at the lengths around that edge,
    with every row full (one attention call), by length groups (a group of full rows beside a one-token one), and
    with padding inside a row (the window counts its positions)."""
    model = tiny_modernbert(num_hidden_layers=2)  # global, sliding: the sliding layer is the last, the shortcut's
    assert model.config.sliding_window == 2 and model.config.layer_types[-1] == "sliding_attention"
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    if layout == "length groups":
        request.getfixturevalue("grouped_attention")
    batch = padded_batch(model, (length, length, 1) if layout == "length groups" else (length, length))
    if layout == "inside":
        batch["attention_mask"][1, 1] = 0
        batch["input_ids"][1, 1] = model.config.pad_token_id
    valid = batch["attention_mask"].bool()
    out, ref = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    assert_close_gradients(gradients(out.loss, model), gradients(ref.loss, reference))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():  # every query of the sliding layer, not only each first one
        ours, theirs = model.model(**inputs).last_hidden_state, reference.model(**inputs).last_hidden_state
    torch.testing.assert_close(ours[valid], theirs[valid], **TOL)


SITE_BY_MODULE = {"embeddings.drop": "embeddings", "attn.out_drop": "attention output", "mlp.drop": "mlp",
                  "drop": "classifier"}


def record_dropout_modules(model, sites: list, inside_layers: bool = True) -> list:
    """Hooks appending (site, p) to ``sites`` as each of ``model``'s nn.Dropout modules runs; ``inside_layers=False``
    leaves the layers' alone (a hook inside a fused layer would make it run its original forward)."""
    hooks = []
    for name, module in model.named_modules():
        site = next((s for suffix, s in SITE_BY_MODULE.items() if name == suffix or name.endswith("." + suffix)), None)
        if site is not None and isinstance(module, torch.nn.Dropout) and (inside_layers or ".layers." not in name):
            hooks.append(module.register_forward_pre_hook(lambda mod, args, s=site: sites.append((s, mod.p))))
    return hooks


@pytest.mark.parametrize("memory", ["default", "lean"])
def test_each_dropout_site_draws_with_the_probability_hugging_face_gives_it(memory, monkeypatch):
    """Distinct probabilities at every site: the attention probabilities and the attention output (Hugging Face's
    attention_dropout, both), the GeGLU output (mlp_dropout), the embeddings and the classifier. Recorded in the order
    each forward applies them: Hugging Face's nn.Dropout modules and SDPA's dropout_p; the fused layers' mask draws
    (torch_ops.dropout_keep, from their seeds: [S, H, L, L] probabilities, [N, d] attention output, [N, GLU width]
    GeGLU output), beside the embeddings' and classifier's modules, which run as they are."""
    model = tiny_modernbert(attention_dropout=0.1, mlp_dropout=0.2, embedding_dropout=0.3, classifier_dropout=0.4)
    reference = reference_bitfit(model).train()
    bitfit_fast.apply(model, backend="torch", memory=memory)
    model.train()
    hidden, glu = model.config.hidden_size, model.config.intermediate_size
    assert hidden != glu
    batch = padded_batch(model, LENGTHS[0])

    theirs = []
    hooks = record_dropout_modules(reference, theirs)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded_sdpa(*args, dropout_p=0.0, **kwargs):
        theirs.append(("attention probabilities", dropout_p))
        return sdpa(*args, dropout_p=dropout_p, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded_sdpa)
        reference(**batch)
    for hook in hooks:
        hook.remove()
    per_layer = [("attention probabilities", 0.1), ("attention output", 0.1), ("mlp", 0.2)]
    expected = [("embeddings", 0.3), *per_layer * model.config.num_hidden_layers, ("classifier", 0.4)]
    assert theirs == expected, "Hugging Face's sites"

    ours = []
    hooks = record_dropout_modules(model, ours, inside_layers=False)
    calls = record_last_layer(model)
    draw = torch_ops.dropout_keep

    def recorded_draw(shape, p, seed, device):
        site = ("attention probabilities" if len(shape) == 4 else
                {hidden: "attention output", glu: "mlp"}.get(shape[-1], f"unknown {tuple(shape)}"))
        ours.append((site, p))
        return draw(shape, p, seed, device)

    monkeypatch.setattr(torch_ops, "dropout_keep", recorded_draw)
    model(**batch)  # the forward's draws only (the backward draws each mask again)
    for hook in hooks:
        hook.remove()
    assert calls == [True], "the stack ran fused, the shortcut in its last layer"
    assert ours == theirs
