"""Bias-free encoders (ModernBERT): zero biases are added by default, train, and survive merge → save_pretrained →
from_pretrained and save_biases → load_biases exactly; merge refuses what a config cannot declare."""

import copy

import pytest
import torch
import transformers
from bitfit_reference import BACKENDS, DEVICE, adamw_steps, padded_batch, tiny_bert, trainable, zero_gradient_bias

import bitfit_fast
from bitfit_fast import BitFitLayerNorm, BitFitLinear
from bitfit_fast.model import QueryRowsBitFitLinear

# Hidden 32 over 4 heads, 2 layers: layer 0 attends globally, layer 1 in a sliding window of 4 tokens.
MODERNBERT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2, attn_implementation="sdpa")
BIAS_FLAGS = ("attention_bias", "classifier_bias", "mlp_bias", "norm_bias")


def tiny_modernbert(num_labels: int = 3, **flags) -> transformers.ModernBertForSequenceClassification:
    config = transformers.ModernBertConfig(**MODERNBERT, **flags, num_labels=num_labels)
    return transformers.ModernBertForSequenceClassification(config).to(DEVICE)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_added_biases_take_the_dtype_of_a_model_cast_whole():
    """A bf16 ModernBERT gets bf16 zero biases (fp32 ones would fail its first forward with a dtype mismatch)."""
    model = bitfit_fast.apply(tiny_modernbert().to(torch.bfloat16), backend="torch", announce=False)
    added = bitfit_fast.model.state_of(model).added_biases
    assert added and {model.get_submodule(name).bias.dtype for name in added} == {torch.bfloat16}
    out = model(**padded_batch(model))
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and all(p.grad is not None for p in trainable(model).values())


def test_bias_free_model_gets_zero_biases_by_default_and_keeps_its_function(capsys):
    model = tiny_modernbert()
    batch = padded_batch(model)
    before = logits(model, batch)
    inputs, valid = {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["attention_mask"].bool()
    with torch.no_grad():
        hidden_before = model.model(**inputs).last_hidden_state[valid]
    bitfit_fast.apply(model)
    # Every Linear and LayerNorm of the body and the head: 15 layers, 736 biases (ModernBERT's layer 0 has no
    # attention LayerNorm).
    assert capsys.readouterr().out == (
        "bitfit_fast: added zero biases to 15 bias-free layers of ModernBertForSequenceClassification (736 "
        "parameters), so step 0 computes the pretrained function\n"
    )
    added = model.bitfit_fast_state.added_biases
    assert model.bitfit_fast_config.add_missing_biases is None and len(added) == 15
    assert "model.layers.1.attn.Wqkv" in added and "head.norm" in added
    assert isinstance(model.model.layers[0].attn.Wqkv, BitFitLinear)
    assert type(model.model.layers[0]).__name__ == "FusedModernBertEncoderLayer", "the zero biases make it fusable"
    assert isinstance(model.model.final_norm, BitFitLayerNorm)
    with torch.no_grad():  # the stack on every token: the same GEMMs, exactly the same function
        torch.testing.assert_close(model.model(**inputs).last_hidden_state[valid], hidden_before, atol=0, rtol=0)
    # The classifier's last layer runs for the first tokens only (the classification shortcut): GEMMs on fewer
    # rows, which may round differently.
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=1e-6)
    assert all(param.requires_grad for name, param in model.named_parameters() if name.endswith(".bias"))


def test_a_frozen_heads_bias_does_not_hide_a_bias_free_encoder():
    model = bitfit_fast.apply(tiny_modernbert(), train_head=False)
    assert model.bitfit_fast_state.added_biases[:2] == ["model.embeddings.norm", "model.layers.0.attn.Wqkv"]
    assert model.classifier.bias.requires_grad and not model.classifier.weight.requires_grad


def test_models_with_biases_get_none_added_by_default(capsys):
    model = bitfit_fast.apply(tiny_bert())
    assert model.bitfit_fast_state.added_biases == []
    assert capsys.readouterr().out == ""


def test_refusing_to_add_biases_to_a_bias_free_model_says_how_and_changes_nothing():
    model = tiny_modernbert()
    with pytest.raises(ValueError, match="no torch.nn.Linear.*add_missing_biases=True gives bias-free layers"):
        bitfit_fast.apply(model, add_missing_biases=False)
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters() if not name.startswith("classifier"))
    assert all(param.requires_grad for param in model.parameters())


def plain_reference(base: transformers.ModernBertForSequenceClassification) -> torch.nn.Module:
    """The same function with every bias declared in the config (zero), trained by plain autograd."""
    reference = tiny_modernbert(**dict.fromkeys(BIAS_FLAGS, True))
    missing = reference.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(name.endswith(".bias") for name in missing)
    with torch.no_grad():
        for name in missing:
            reference.get_parameter(name).zero_()
    return reference


@pytest.mark.parametrize("biases", ["all", "subset"])
def test_added_biases_get_the_plain_autograd_gradients(biases):
    model = tiny_modernbert()
    reference = plain_reference(model)
    bitfit_fast.apply(model, biases=biases, announce=False)
    batch = padded_batch(model)
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    expected = dict(reference.named_parameters())
    trained_biases = {n: p for n, p in trainable(model).items() if n.endswith(".bias")}
    if biases == "subset":
        body = sorted(name for name in trained_biases if name.startswith("model."))
        assert body == [f"model.layers.{i}.{m}.bias" for i in (0, 1) for m in ("attn.Wqkv", "mlp.Wi")]
    for name, param in trained_biases.items():
        grad = expected[name].grad
        if name.endswith("attn.Wqkv.bias") and biases == "subset":  # the paper's b_q: only the query rows train
            assert isinstance(model.get_submodule(name.removesuffix(".bias")), QueryRowsBitFitLinear)
            grad = torch.cat([grad[:32], torch.zeros_like(grad[32:])])
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, grad, atol=1e-6, rtol=1e-4, msg=name)


def test_subset_trains_only_the_query_rows_of_the_packed_projection():
    model = bitfit_fast.apply(tiny_modernbert(), biases="subset", announce=False)
    adamw_steps(model, [padded_batch(model) for _ in range(3)])
    qkv_bias = model.model.layers[1].attn.Wqkv.bias
    assert qkv_bias[:32].abs().min() > 0, "every query row moved"
    assert torch.equal(qkv_bias[32:], torch.zeros(64, device=DEVICE)), "key and value rows stay exactly zero"


def trained(make, biases="all"):
    model = make()
    base = copy.deepcopy(model)
    bitfit_fast.apply(model, biases=biases)
    adamw_steps(model, [padded_batch(model) for _ in range(3)])
    return model.eval(), base


@pytest.mark.parametrize("make", [tiny_modernbert, tiny_bert], ids=["modernbert", "bert"])
def test_merge_save_pretrained_from_pretrained_reproduces_the_trained_model(make, tmp_path):
    model, _ = trained(make)
    batch = padded_batch(model)
    expected = logits(model, batch)
    added = [f"{name}.bias" for name in model.bitfit_fast_state.added_biases]
    assert all(model.get_parameter(name).abs().max() > 0 for name in added), "the added biases trained"

    merged = bitfit_fast.merge(model)
    if make is tiny_modernbert:
        assert all(getattr(merged.config, flag) for flag in BIAS_FLAGS)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-6, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded, info = type(merged).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    torch.testing.assert_close(logits(reloaded.to(DEVICE), batch), logits(merged, batch), atol=0, rtol=0)


def test_a_checkpoint_of_the_applied_model_reloads_its_added_biases(tmp_path):
    """apply() declares the biases it adds in the config, so save_pretrained of the applied model itself (what the
    Hugging Face Trainer writes at every checkpoint) reloads them into the vanilla class (it dropped them, found by
    an audit)."""
    model, _ = trained(tiny_modernbert)
    assert all(getattr(model.config, flag) for flag in BIAS_FLAGS)
    model.save_pretrained(tmp_path)
    reloaded, info = transformers.ModernBertForSequenceClassification.from_pretrained(tmp_path,
                                                                                      output_loading_info=True)
    assert not any(info.values()), info
    batch = padded_batch(model)
    torch.testing.assert_close(logits(reloaded.to(DEVICE), batch), logits(model, batch), atol=1e-6, rtol=0)
    undeclared = (r"cannot be declared by its config flags, so save_pretrained .* writes them but from_pretrained "
                  r"drops them: keep the trained values with .*save_biases")
    with pytest.warns(bitfit_fast.UndeclaredBiasesWarning, match=undeclared):
        subset, _ = trained(tiny_modernbert, biases="subset")  # no flags declare exactly these: the config is kept
    assert not any(getattr(subset.config, flag) for flag in BIAS_FLAGS)


def test_apply_declares_added_biases_on_the_models_own_config():
    """Another model built from the same config object keeps its flags off: it has no such biases."""
    config = transformers.ModernBertConfig(**MODERNBERT, num_labels=3)
    applied = transformers.ModernBertForSequenceClassification(config)
    other = transformers.ModernBertForSequenceClassification(config)
    bitfit_fast.apply(applied)
    assert all(getattr(applied.config, flag) for flag in BIAS_FLAGS)
    assert all(module.config is applied.config for module in applied.modules() if hasattr(module, "config"))
    assert not any(getattr(config, flag) for flag in BIAS_FLAGS) and other.config is config


def test_load_biases_onto_a_fresh_bias_free_base_restores_them_exactly(tmp_path):
    model, base = trained(tiny_modernbert)
    bitfit_fast.save_biases(model, tmp_path)
    bitfit_fast.load_biases(base, tmp_path)
    assert base.bitfit_fast_state.added_biases == model.bitfit_fast_state.added_biases
    assert trainable(base).keys() == trainable(model).keys()
    batch = padded_batch(model)
    torch.testing.assert_close(logits(base, batch), logits(model, batch), atol=0, rtol=0)


def test_loading_added_biases_onto_a_model_applied_without_them_says_how(tmp_path):
    model, _ = trained(tiny_modernbert)
    bitfit_fast.save_biases(model, tmp_path)
    applied = bitfit_fast.apply(tiny_modernbert(), biases=["classifier"], train_head=False, add_missing_biases=False)
    with pytest.raises(ValueError, match=r"biases apply\(\) added to a bias-free model: .*add_missing_biases=True"):
        bitfit_fast.load_biases(applied, tmp_path, strict=False)


def assert_refused_unchanged(model, message):
    state = {name: param.detach().clone() for name, param in model.state_dict().items()}
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=message):
        bitfit_fast.merge(model)
    assert model.config.to_dict() == config and hasattr(model, "bitfit_fast_config")
    assert any(isinstance(m, BitFitLinear) for m in model.modules())
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_merge_refuses_biases_the_config_flags_cannot_declare_exactly(tmp_path):
    # subset adds Wqkv and Wi biases; attention_bias and mlp_bias would also create the Wo biases.
    with pytest.warns(bitfit_fast.UndeclaredBiasesWarning):  # apply() says so already
        model, base = trained(tiny_modernbert, biases="subset")
    assert_refused_unchanged(
        model, r"attention_bias=True would also create model\.layers\.0\.attn\.Wo\.bias \(and 1 more\).*"
        r"save_biases\(model, dir\).*load_biases\(base_model, dir\)"
    )
    bitfit_fast.save_biases(model, tmp_path)  # the way the error points to works
    bitfit_fast.load_biases(base, tmp_path)
    batch = padded_batch(model)
    torch.testing.assert_close(logits(base, batch), logits(model, batch), atol=0, rtol=0)


T5 = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_t5_encoders_added_biases_train_as_plain_autograd_trains_them(backend):
    """A bias-free family on the module path: T5's encoder with the zero biases apply() adds equals the same model
    with those biases added by hand and trained by plain autograd (everything else frozen): its output, each
    bias gradient and the biases after three AdamW steps. Its key biases' true gradient is zero (T5 adds relative
    positions to the scores, not to the keys): ours is exactly zero, the reference's rounding noise is zeroed
    before each step, as ``adamw_steps`` does."""
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**T5)).to(DEVICE)
    reference = copy.deepcopy(model).requires_grad_(False)
    for module in reference.modules():
        if isinstance(module, torch.nn.Linear):
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, device=DEVICE))
    with pytest.warns(bitfit_fast.UndeclaredBiasesWarning):
        bitfit_fast.apply(model, backend=backend)
    assert trainable(model).keys() == trainable(reference).keys() and len(trainable(model)) == 12
    batches = [torch.randint(2, T5["vocab_size"], (3, length), device=DEVICE) for length in (7, 5, 9)]
    directions = [torch.randn(3, length, T5["d_model"], device=DEVICE) for length in (7, 5, 9)]

    def steps(m):
        optimizer = torch.optim.AdamW(trainable(m).values(), lr=1e-2)
        outputs, grads = [], []
        for input_ids, direction in zip(batches, directions):
            optimizer.zero_grad()
            out = m(input_ids=input_ids).last_hidden_state
            (out * direction).sum().backward()
            for name, param in trainable(m).items():
                if zero_gradient_bias(name):
                    assert m is reference or not param.grad.any(), f"{name}'s true gradient is zero; ours is not"
                    param.grad.zero_()
            outputs.append(out.detach())
            grads.append({name: p.grad.clone() for name, p in trainable(m).items()})
            optimizer.step()
        return outputs, grads, {name: p.detach() for name, p in trainable(m).items()}

    (outputs, grads, biases), (ref_outputs, ref_grads, ref_biases) = steps(model), steps(reference)
    for step, (out, ref_out) in enumerate(zip(outputs, ref_outputs)):
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4, msg=f"step {step} output")
    for step, (ours, theirs) in enumerate(zip(grads, ref_grads)):
        for name, grad in theirs.items():
            scale = grad.abs().max().item()
            assert scale > 0 or zero_gradient_bias(name), name
            torch.testing.assert_close(ours[name], grad, atol=1e-5 * scale, rtol=1e-4, msg=f"step {step} {name}")
    for name, bias in ref_biases.items():
        torch.testing.assert_close(biases[name], bias, atol=1e-5, rtol=1e-4, msg=name)


def test_merge_refuses_added_biases_of_a_family_without_flags():
    # T5's linear layers have no bias and its config no flag for one.
    config = transformers.T5Config(**T5)
    with pytest.warns(bitfit_fast.UndeclaredBiasesWarning, match="12 biases added to this T5EncoderModel"):
        model = bitfit_fast.apply(transformers.T5EncoderModel(config).to(DEVICE))
    assert "encoder.block.0.layer.0.SelfAttention.q" in model.bitfit_fast_state.added_biases
    assert_refused_unchanged(model, r"no flag of T5Config declares \['encoder\.block\.0\.layer\.0\.Self")


def test_a_class_that_cannot_be_built_from_its_config_alone_is_applied_with_its_added_biases_undeclared():
    # apply() declares added biases by building the class again from its config: a subclass whose __init__ takes
    # more raised a TypeError there after the biases were added, and left the model half applied.
    class WithExtra(transformers.ModernBertForSequenceClassification):
        def __init__(self, config, extra):
            super().__init__(config)

    model = WithExtra(tiny_modernbert().config, extra=1).to(DEVICE)
    with pytest.warns(bitfit_fast.UndeclaredBiasesWarning, match="cannot be declared by its config flags"):
        bitfit_fast.apply(model, biases="subset")
    assert model.bitfit_fast_state.added_biases and any(isinstance(m, BitFitLinear) for m in model.modules())
    assert_refused_unchanged(model, r"this WithExtra cannot be built again from its config alone \(TypeError: .*"
                                    r"extra.*save_biases\(model, dir\)")
