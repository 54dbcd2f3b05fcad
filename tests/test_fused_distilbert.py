"""DistilBERT's layers fused through the family registry: against reference BitFit on uneven padded batches, every
layer path and both backends; the unpadded encoder; the classification shortcut of
DistilBertForSequenceClassification and what turns it off; dropout (none between out_lin and the residual)."""

import copy

import pytest
import torch
import transformers
from bitfit_reference import (
    BACKENDS,
    DEVICE,
    PATHS,
    adamw_steps,
    assert_gradients_match,
    autocast_outputs,
    check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards,
    enable_hf_checkpointing,
    padded_batch,
    reference_bitfit,
    returned_states,
    trainable,
    with_random_biases,
    without_zero_gradients,
)
from kernel_checks import assert_autocast_as_accurate_as_torch, assert_gemms_ran_in
from transformers.masking_utils import create_bidirectional_mask

import bitfit_fast
from bitfit_fast.families import layer_spec
from bitfit_fast.fused_layer import FusedEncoder, FusedEncoderLayer

# dim 36 over 3 heads (head dim 12), hidden_dim 52: nothing is a power of two.
TINY_DISTILBERT = dict(vocab_size=97, dim=36, n_heads=3, hidden_dim=52, n_layers=2, dropout=0.0,
                       attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=64)
TOL = dict(atol=2e-5, rtol=1e-4)
# Very uneven lengths: one token beside the full length, no padding at all, one sequence, mostly one-token rows.
LENGTHS = [(1, 13, 7, 2), (11, 11, 11), (1,), (5, 1, 1)]


def tiny_distilbert(num_labels: int = 3, **overrides) -> transformers.DistilBertForSequenceClassification:
    """A DistilBERT classifier whose biases and LayerNorm gains are random, some gains near zero as pretrained
    (HF initialises biases to zero and gains to one: their values would not matter)."""
    config = transformers.DistilBertConfig(**{**TINY_DISTILBERT, **overrides}, num_labels=num_labels)
    return with_random_biases(transformers.DistilBertForSequenceClassification(config), gains=True)


def layers(model):
    return list(model.distilbert.transformer.layer)


def first_only_calls(model, batch, **kwargs) -> list[bool]:
    """The ``first_only`` argument each fused layer's fused_forward received in one forward, in call order."""
    calls = []
    spied = [layer for layer in layers(model) if isinstance(layer, FusedEncoderLayer)]
    for layer in spied:
        def spy(x, tokens, first_only=False, *args, original=layer.fused_forward):
            calls.append(first_only)
            return original(x, tokens, first_only, *args)

        layer.fused_forward = spy  # an instance attribute, in front of the class's method
    try:
        model(**batch, **kwargs)
    finally:
        for layer in spied:
            del layer.fused_forward
    return calls


def encoder_rows(model, batch, **kwargs) -> int:
    """How many positions per sequence the fused encoder returned (1 when the shortcut ran)."""
    return returned_states(model.distilbert.transformer, model, batch, **kwargs)[1][1]


def assert_same_gradients(model, reference, one_token: bool = False):
    """Each gradient relative to its own scale (q_lin.bias's is ~4e-7). Where every sequence is ``one_token``
    long its query cannot move its attention: q_lin.bias's true gradient is zero."""
    assert trainable(model).keys() == trainable(reference).keys()
    queries = tuple(name for name in trainable(model) if name.endswith("q_lin.bias")) if one_token else ()
    assert_gradients_match(model, reference, noise=queries)



def assert_same_step(model, reference, batch):
    """The same logits, loss and gradients as the reference on ``batch``."""
    out, ref = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    out.loss.backward()
    ref.loss.backward()
    assert_same_gradients(model, reference, one_token=bool(batch["attention_mask"].sum(1).max() == 1))


def test_the_registry_describes_distilbert_without_an_attention_output_dropout():
    spec = layer_spec("TransformerBlock")
    assert spec.attention_output_dropout is None
    assert spec.dropouts() == ("attention.dropout", "ffn.dropout")
    layer = layers(tiny_distilbert())[0]
    assert all(isinstance(layer.get_submodule(path), torch.nn.Linear) for path in spec.linears())
    assert all(isinstance(layer.get_submodule(path), torch.nn.LayerNorm) for path in spec.norms())
    assert getattr(layer.get_submodule(spec.attention), spec.heads) == 3


@pytest.mark.parametrize("path", list(PATHS))
def test_layers_and_encoder_are_fused_on_the_fused_paths_only(path):
    model = bitfit_fast.apply(tiny_distilbert(), backend="torch", **PATHS[path])
    fused = path != "modules"
    assert all(type(layer).__name__.startswith("Fused") == fused for layer in layers(model))
    assert all(isinstance(layer, FusedEncoderLayer) == fused for layer in layers(model))
    expected = "FusedTransformerBlock" if fused else "TransformerBlock"
    assert {type(layer).__name__ for layer in layers(model)} == {expected}
    encoder = model.distilbert.transformer
    assert type(encoder).__name__.startswith("Fused") == fused and isinstance(encoder, FusedEncoder) == fused
    assert isinstance(encoder, transformers.models.distilbert.modeling_distilbert.Transformer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
def test_logits_loss_gradients_and_adamw_steps_match_the_reference(backend, path):
    model = tiny_distilbert()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend, **PATHS[path])

    assert_same_step(model, reference, padded_batch(model, LENGTHS[0]))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    batches = [padded_batch(model, lengths) for lengths in LENGTHS]
    losses = adamw_steps(model, batches)
    ref_losses = adamw_steps(reference, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    ref_state = dict(reference.named_parameters())
    for name, param in bitfit_fast.merge(model).named_parameters():
        torch.testing.assert_close(param, ref_state[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
        if not param.requires_grad:
            assert torch.equal(param, initial[name]), f"frozen {name} changed"
        elif not name.endswith("attention.k_lin.bias"):  # moves by weight decay only
            assert not torch.equal(param, initial[name]), f"trainable {name} did not move"


def test_the_paper_subset_matches_the_reference():
    model = tiny_distilbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, biases="subset", backend="torch")
    for name, param in reference.named_parameters():
        param.requires_grad_(name.startswith(("pre_classifier", "classifier"))
                             or name.endswith(("attention.q_lin.bias", "ffn.lin1.bias")))
    assert trainable(model).keys() == trainable(reference).keys()
    batches = [padded_batch(model, lengths) for lengths in LENGTHS]
    assert adamw_steps(model, batches) == pytest.approx(adamw_steps(reference, batches), rel=1e-4, abs=1e-5)
    ref_state = trainable(reference)
    for name, param in trainable(model).items():
        torch.testing.assert_close(param, ref_state[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_the_classification_shortcut_runs_the_last_layer_on_first_tokens_only(backend, lengths):
    model = tiny_distilbert(n_layers=3)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend)
    batch = padded_batch(model, lengths)
    assert first_only_calls(model, batch) == [False, False, True]
    assert encoder_rows(model, batch) == 1
    assert not model.distilbert.transformer.first_token_only, "the flag lasts one forward"
    assert_same_step(model, reference, batch)


def test_hidden_states_turn_the_shortcut_off_and_stay_exact():
    model = tiny_distilbert(n_layers=3)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (9, 1, 5))
    valid = batch["attention_mask"].bool()
    assert first_only_calls(model, batch, output_hidden_states=True) == [False, False, False]
    assert encoder_rows(model, batch, output_hidden_states=True) == 9
    out = model(**batch, output_hidden_states=True)
    ref = reference(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours[valid], theirs[valid], **TOL)  # padding positions are zeros here
    out.loss.backward()
    ref.loss.backward()
    assert_same_gradients(model, reference)

    model.config.output_hidden_states = True
    assert encoder_rows(model, batch) == 9
    model.config.output_hidden_states = False
    assert encoder_rows(model, batch) == 1


def test_attention_weights_run_the_original_forward_and_turn_the_shortcut_off():
    model = tiny_distilbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    model.set_attn_implementation("eager")
    reference.set_attn_implementation("eager")
    batch = padded_batch(model, (6, 1, 4))
    assert first_only_calls(model, batch, output_attentions=True) == []
    out, ref = model(**batch, output_attentions=True), reference(**batch, output_attentions=True)
    assert len(out.attentions) == 2
    for ours, theirs in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)


def test_other_heads_and_the_base_model_get_every_token():
    config = transformers.DistilBertConfig(**TINY_DISTILBERT)
    torch.manual_seed(0)
    model = transformers.DistilBertForTokenClassification(config).to(DEVICE)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = {k: v for k, v in padded_batch(model, (6, 1, 4)).items() if k != "labels"}
    valid = batch["attention_mask"].bool()
    assert first_only_calls(model, batch) == [False, False]
    assert encoder_rows(model, batch) == 6
    torch.testing.assert_close(model(**batch).logits[valid], reference(**batch).logits[valid], **TOL)

    classifier = bitfit_fast.apply(tiny_distilbert(), backend="torch")
    hidden = classifier.distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert hidden.last_hidden_state.shape[:2] == (3, 6)


def test_a_layer_called_on_its_own_unpads_itself():
    model = tiny_distilbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    batch = padded_batch(model, (7, 1, 3))
    valid = batch["attention_mask"].bool()
    hidden = model.distilbert.embeddings(batch["input_ids"])
    mask = create_bidirectional_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"])
    ours = layers(model)[0](hidden, mask)
    theirs = reference.distilbert.transformer.layer[0](hidden, mask)
    torch.testing.assert_close(ours[valid], theirs[valid], **TOL)


def test_gelu_only_a_relu_distilbert_keeps_the_module_path_and_stays_exact():
    model = tiny_distilbert(activation="relu")
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    batch = padded_batch(model, (5, 1, 3))
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, **TOL)


def test_hugging_face_gradient_checkpointing_runs_through_the_unpadded_encoder():
    model = tiny_distilbert(n_layers=3)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    enable_hf_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in layers(model))
    batch = padded_batch(model, (9, 1, 5))
    out, ref = model(**batch), reference(**batch)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    out.loss.backward()
    ref.loss.backward()
    assert_same_gradients(model, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["default", "minimal"])
def test_dropout_same_seed_same_result_and_gradient_of_the_computed_forward(backend, memory):
    model = tiny_distilbert(dropout=0.1, attention_dropout=0.1)
    with torch.no_grad():  # the head's ReLU kept off its kink, where finite differences would not be the gradient
        model.pre_classifier.bias.add_(5.0)
    model = bitfit_fast.apply(model, backend=backend, memory=memory).train()
    check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards(model, padded_batch(model, (7, 1, 4)))


def test_training_reads_only_the_dropouts_distilbert_has():
    """In training mode (no attention-output dropout in the spec) the forward at p=0 is the reference's, and the
    feed-forward dropout, after lin2, runs once its probability is raised."""
    model = tiny_distilbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch")
    model.train()
    reference.train()
    batch = padded_batch(model, (7, 1, 4))
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, **TOL)
    for layer in layers(model):
        layer.ffn.dropout.p = 0.5
    torch.manual_seed(0)
    assert not torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-5), "the FFN's dropout runs"


# Triton's interpreter cannot run a bf16 tl.dot: bf16 on Triton runs on a GPU only.
AUTOCAST_CASES = [pytest.param(precision, path, backend, id=f"{str(precision).removeprefix('torch.')}-{path}-{backend}",
                               marks=[pytest.mark.gpu] if (precision, backend) == (torch.bfloat16, "triton") else [])
                  for precision in (torch.float16, torch.bfloat16) for path in PATHS for backend in BACKENDS]


@pytest.mark.parametrize("precision,path,backend", AUTOCAST_CASES)
def test_autocast_is_as_accurate_as_torch_at_the_same_precision(precision, path, backend, gemm_dtypes):
    """Every layer path under fp16 and bf16 autocast: the logits and every gradient by flash-attention's rule
    against the fp32 reference (kernel_checks), the GEMMs in the autocast dtype."""
    model = tiny_distilbert()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend, **PATHS[path])
    ours, same, exact = autocast_outputs(model, reference, padded_batch(model, LENGTHS[0]), precision)
    assert_gemms_ran_in(precision, gemm_dtypes)
    without_zero_gradients(ours, same, exact)
    assert_autocast_as_accurate_as_torch(ours, same, exact, precision, f"DistilBERT {path} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_packed_row_with_the_collators_flash_attention_arguments_equals_the_padded_batch(backend):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) on a token classifier: the sequences of the packed
    row run apart (DistilBERT's model does not hand position_ids to its layers: the cu_seq_lens do it), every real
    token's logit and every gradient as on the padded batch. Without those arguments they attend to each other, as
    under Hugging Face's own SDPA attention, whose output ours then equals."""
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(**TINY_DISTILBERT, num_labels=3)
    base = with_random_biases(transformers.DistilBertForTokenClassification(config), gains=True)
    reference = reference_bitfit(base)
    model = bitfit_fast.apply(copy.deepcopy(base), backend=backend, announce=False)
    lengths = (5, 1, 8, 3)
    padded = padded_batch(model, lengths)
    valid = padded["attention_mask"].bool()
    features = [dict(input_ids=padded["input_ids"][row, :length].tolist(), labels=[row % 3] * length)
                for row, length in enumerate(lengths)]
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(features)
    packed = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in packed.items()}
    labels = (torch.arange(len(lengths), device=DEVICE)[:, None] % 3).expand_as(valid).clone()
    labels[~valid] = -100
    labels[:, 0] = -100  # the collator masks each sequence's first label
    params = list(trainable(model).values())
    flat = model(**packed)
    ours = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels)
    torch.testing.assert_close(flat.logits[0], ours.logits[valid], **TOL)
    torch.testing.assert_close(flat.loss, ours.loss, **TOL)
    for name, flat_grad, grad in zip(trainable(model), torch.autograd.grad(flat.loss, params),
                                     torch.autograd.grad(ours.loss, params)):
        torch.testing.assert_close(flat_grad, grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)

    position_ids_only = {key: packed[key] for key in ("input_ids", "position_ids", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(model(**position_ids_only).logits, reference(**position_ids_only).logits, **TOL)
        assert not torch.allclose(model(**position_ids_only).logits[0], ours.logits[valid], atol=1e-5)
