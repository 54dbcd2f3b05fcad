"""bitfit_fast.apply against plain PyTorch BitFit on the same Hugging Face model."""

import pytest
import torch
from bitfit_reference import (
    BACKENDS,
    MODELS,
    PATHS,
    adamw_steps,
    assert_gradients_match,
    padded_batch,
    reference_bitfit,
    trainable,
    with_random_biases,
    zero_gradient_bias,
)

import bitfit_fast

TOL = dict(atol=2e-5, rtol=1e-4)  # parameters after AdamW steps, which divide each gradient by its own scale
OUTPUT_TOL = dict(atol=1e-6, rtol=1e-5)  # fp32 logits of ~0.1, apart by the sums' order only (~1e-8 seen)


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
