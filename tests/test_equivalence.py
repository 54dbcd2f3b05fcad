"""bitfit_fast.apply against plain PyTorch BitFit on the same Hugging Face model."""

import pytest
import torch
from bitfit_reference import (
    BACKENDS,
    MODELS,
    PATHS,
    adamw_steps,
    assert_gradients_match,
    autocast_outputs,
    padded_batch,
    reference_bitfit,
    trainable,
    with_random_biases,
    without_zero_gradients,
    zero_gradient_bias,
)
from kernel_checks import assert_autocast_as_accurate_as_torch, assert_gemms_ran_in
from test_fused_distilbert import tiny_distilbert
from test_fused_modernbert import tiny_modernbert

import bitfit_fast

TOL = dict(atol=2e-5, rtol=1e-4)  # parameters after AdamW steps, which divide each gradient by its own scale
OUTPUT_TOL = dict(atol=1e-6, rtol=1e-5)  # fp32 logits of ~0.1, apart by the sums' order only (~1e-8 seen)


# The fp64 reference's own rounding: ModernBERT's query and key biases' sums lose ~3e-10 of theirs.
FLOAT64_MODELS = {"distilbert": (tiny_distilbert, 1e-10), "modernbert": (tiny_modernbert, 1e-8)}


@pytest.mark.parametrize("arch", list(FLOAT64_MODELS))
@pytest.mark.parametrize("path", list(PATHS))
def test_a_model_in_float64_computes_in_float64(arch, path):
    """Cast to float64 on the torch backend (as gradcheck wants it): logits and gradients to fp64's rounding of the
    fp64 reference, where the torch ops' sums, statistics and rotations in fp32 would be off by ~1e-7 of each
    value. DistilBERT's and ModernBERT's own fused layers; BERT's on real MiniLM in test_real_weights.py."""
    make, rel = FLOAT64_MODELS[arch]
    model = make().double()
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend="torch", **PATHS[path])
    batch = padded_batch(model, (11, 4, 8))
    out, ref = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-12)
    out.loss.backward()
    ref.loss.backward()
    assert_gradients_match(model, reference, rel=rel)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
def test_logits_loss_and_gradients_match(arch, backend, path):
    # Random biases and LayerNorm gains, as pretrained models have them: a LayerNorm's parameters mixed up with
    # another's (in a memory mode's recomputation, say) would not show with Hugging Face's ones and zeros.
    model = with_random_biases(MODELS[arch](), gains=True)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend, **PATHS[path])
    assert type(model.base_model.encoder.layer[0]).__name__.startswith("Fused") == (path != "modules")
    assert trainable(model).keys() == trainable(reference).keys()

    batch = padded_batch(model)
    out, ref_out = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, **OUTPUT_TOL)
    torch.testing.assert_close(out.loss, ref_out.loss, **OUTPUT_TOL)
    out.loss.backward()
    ref_out.loss.backward()
    assert_gradients_match(model, reference)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_layer_norms_take_the_models_eps(arch, backend):
    """Every other test's model has Hugging Face's default eps, 1e-12, which a fused LayerNorm would also get by
    ignoring the model's: RoBERTa, XLM-R and CamemBERT checkpoints have 1e-5."""
    model = with_random_biases(MODELS[arch](layer_norm_eps=1e-3), gains=True)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend)
    batch = padded_batch(model)
    out, ref_out = model(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, **OUTPUT_TOL)
    out.loss.backward()
    ref_out.loss.backward()
    assert_gradients_match(model, reference)


# Triton's interpreter cannot run a bf16 tl.dot: bf16 on Triton runs on a GPU only.
AUTOCAST_CASES = [pytest.param(arch, backend, path, precision,
                               id=f"{arch}-{backend}-{path}-{str(precision).removeprefix('torch.')}",
                               marks=[pytest.mark.gpu] if (precision, backend) == (torch.bfloat16, "triton") else [])
                  for arch in MODELS for backend in BACKENDS for path in PATHS
                  for precision in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("arch,backend,path,precision", AUTOCAST_CASES)
def test_autocast_is_as_accurate_as_torch_at_the_same_precision(arch, backend, path, precision, gemm_dtypes):
    """Config-built BERT and RoBERTa (random biases and gains, some near zero) by flash-attention's rule
    (``kernel_checks``) against the fp32 reference: real MiniLM's tests cover BERT's weights, these RoBERTa's
    layout (its position offset) and every path on either backend."""
    model = with_random_biases(MODELS[arch](), gains=True)
    reference = reference_bitfit(model)
    bitfit_fast.apply(model, backend=backend, **PATHS[path])
    ours, same, exact = autocast_outputs(model, reference, padded_batch(model, lengths=(31, 17, 5, 31)), precision)
    assert_gemms_ran_in(precision, gemm_dtypes)
    without_zero_gradients(ours, same, exact)
    assert_autocast_as_accurate_as_torch(ours, same, exact, precision, f"{arch} {path} on {backend}")


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("biases", ["all", "subset"])
@pytest.mark.parametrize("path", list(PATHS))
def test_five_adamw_steps_match_and_frozen_weights_stay_bit_identical(arch, backend, biases, path):
    model = MODELS[arch]()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = reference_bitfit(model)
    if biases == "subset":
        for name, param in reference.named_parameters():
            param.requires_grad_(name.startswith("classifier") or
                                 name.endswith(("attention.self.query.bias", "intermediate.dense.bias")))
    bitfit_fast.apply(model, biases=biases, backend=backend, **PATHS[path])
    assert trainable(model).keys() == trainable(reference).keys()

    batches = [padded_batch(model, lengths) for lengths in [(7, 3, 5), (1,), (6, 6), (2, 5, 4, 3), (5,)]]
    losses = adamw_steps(model, batches)
    ref_losses = adamw_steps(reference, batches)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)

    ref_state = dict(reference.named_parameters())
    for name, param in bitfit_fast.merge(model).named_parameters():
        torch.testing.assert_close(param, ref_state[name], **TOL, msg=name)
        if not param.requires_grad:
            assert torch.equal(param, initial[name]), f"frozen {name} changed"
        elif not zero_gradient_bias(name):  # those move by weight decay only, here from zero: not at all
            assert not torch.equal(param, initial[name]), f"trainable {name} did not move"
