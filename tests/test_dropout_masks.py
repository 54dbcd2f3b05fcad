"""With dropout on, the fused torch path computes exactly what reference BitFit computes with the same masks.

The fused path draws its masks itself (from seeds, again in the backward); the reference is Hugging Face's model
with every dropout replaced by a replay of the mask the fused path drew at that place. Masks live on the batch's
real tokens in the fused path (and on each sequence's first row in the last layer: the classification shortcut),
so they are scattered to the padded positions the reference uses; what lands on padding never reaches the logits.
On a config-built BERT and on real pretrained MiniLM.
"""

import copy
import functools

import pytest
import torch
import transformers.models.bert.modeling_bert as modeling_bert
from bitfit_reference import (
    DEVICE,
    assert_gradients_match,
    padded_batch,
    real_minilm,
    reference_bitfit,
    tiny_bert,
    trainable,
)

import bitfit_fast
from bitfit_fast import torch_ops
from bitfit_fast.unpadding import LengthGroup, Tokens

P = 0.25  # the hidden-state dropouts: embeddings, each layer's two, classifier
ATTENTION_P = 0.4  # another rate, so that a dropout drawn at the other's rate shows


class Replay(torch.nn.Module):
    """A dropout that multiplies by a recorded scaled keep mask (keep / (1 - p))."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale.to(x.dtype)


def _record_module_dropout(module: torch.nn.Dropout, store: list):
    """A hook recording an nn.Dropout's scaled keep mask from its input and output."""
    def hook(_, args, out):
        store.append(torch.where(args[0] != 0, out / args[0], torch.zeros_like(out)).detach())
    return module.register_forward_hook(hook)


def _padded(rows: torch.Tensor, valid: torch.Tensor, first_only: bool) -> torch.Tensor:
    """A fused path's [N, d] real-token (or [S, d] first-row) mask at the reference's [B, T, d] positions; 1
    elsewhere."""
    full = torch.ones(*valid.shape, rows.shape[-1], device=rows.device, dtype=rows.dtype)
    if first_only:
        full[:, 0] = rows
    else:
        full[valid] = rows
    return full


MODELS = {"config-built": tiny_bert, "real MiniLM": functools.partial(real_minilm, 3)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("memory", ["default", "lean", "minimal"])
@pytest.mark.parametrize("attention", ["one call", "length groups"])
def test_fused_torch_path_equals_the_reference_applying_the_same_masks(model, memory, attention, monkeypatch,
                                                                         request):
    # On CUDA the default memory mode hands attention dropout to scaled_dot_product_attention, whose mask cannot be
    # read back: there the attention probabilities keep no dropout, and every other dropout is compared.
    attention_p = 0.0 if memory == "default" and DEVICE == "cuda" else ATTENTION_P
    base = MODELS[model](hidden_dropout_prob=P, attention_probs_dropout_prob=attention_p, classifier_dropout=P)
    ours = bitfit_fast.apply(copy.deepcopy(base), backend="torch", memory=memory, announce=False).train()
    reference = reference_bitfit(copy.deepcopy(base)).train()
    batch = padded_batch(base, lengths=(7, 1, 5, 7, 3))  # the longest fills the padded width
    valid = batch["attention_mask"].bool()
    layers = base.config.num_hidden_layers
    if attention == "length groups":
        request.getfixturevalue("grouped_attention")
    # The attention layout the fused path runs: its sequences' order and the groups that each draw a mask.
    tokens = Tokens.of_batch(valid[..., None], valid[:, None, None, :])
    assert (tokens.groups is not None) == (attention == "length groups")
    groups = tokens.groups or (LengthGroup(0, len(valid), valid.shape[1], True),)
    order = tokens.order if tokens.order is not None else torch.arange(len(valid), device=DEVICE)

    # The fused path: every mask its ops draw (attention probabilities, then the two hidden-state dropouts of each
    # layer, in order), and the embeddings' and classifier's nn.Dropout masks.
    drawn, seeds, rates, recording = [], [], [], [True]
    draw = torch_ops.dropout_keep

    def recorded_draw(shape, p, seed, device):
        keep = draw(shape, p, seed, device)
        if recording[0]:
            drawn.append(keep.to(torch.float32) * torch_ops.keep_scale(p))
            seeds.append(seed)
            rates.append(p)
        return keep

    monkeypatch.setattr(torch_ops, "dropout_keep", recorded_draw)
    embedding_masks, classifier_masks = [], []
    hooks = [_record_module_dropout(ours.bert.embeddings.dropout, embedding_masks),
             _record_module_dropout(ours.dropout, classifier_masks)]
    out = ours(**batch)
    recording[0] = False
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    per_layer = (len(groups) if attention_p else 0) + 2
    assert len(drawn) == per_layer * layers, "attention masks (one a group, with attention dropout), two hidden-state"
    assert len(set(seeds)) == len(seeds), "every mask, each group's too, is drawn from a seed of its own"
    # The masks below are replayed as drawn, at whatever rate: each must have been drawn at its module's.
    assert rates == ([attention_p] * (per_layer - 2) + [P, P]) * layers

    # The reference with those masks in their places.
    probabilities = []
    for layer in range(layers):
        *attention_masks, first_hidden, second_hidden = drawn[per_layer * layer:per_layer * (layer + 1)]
        shortcut = layer == layers - 1 and first_hidden.shape[0] == len(valid)  # the last layer ran first rows only
        full = torch.ones(len(valid), base.config.num_attention_heads, valid.shape[1], valid.shape[1], device=DEVICE)
        for group, mask in zip(groups, attention_masks, strict=True):
            assert mask.shape[2:] == (1 if shortcut else group.length, group.length)
            full[order[group.first:group.first + group.count], :, :mask.shape[2], :group.length] = mask
        probabilities.append(full)
        modules = reference.bert.encoder.layer[layer]
        modules.attention.output.dropout = Replay(_padded(first_hidden, valid, shortcut))
        modules.output.dropout = Replay(_padded(second_hidden, valid, shortcut))
    assert drawn[-1].shape[0] == len(valid), "the classification shortcut ran: the last masks are first rows"
    reference.bert.embeddings.dropout = Replay(embedding_masks[0])
    reference.dropout = Replay(classifier_masks[0])
    eager = modeling_bert.eager_attention_forward
    queue = iter(probabilities)

    def replayed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = torch.softmax(attn_weights.float(), dim=-1) * next(queue)
        return torch.matmul(attn_weights.to(value.dtype), value).transpose(1, 2).contiguous(), attn_weights

    monkeypatch.setattr(modeling_bert, "eager_attention_forward", replayed_attention)
    reference.config._attn_implementation = "eager"
    expected = reference(**batch)
    expected.loss.backward()
    monkeypatch.setattr(modeling_bert, "eager_attention_forward", eager)

    torch.testing.assert_close(out.logits, expected.logits, atol=2e-5, rtol=1e-4)
    assert set(trainable(ours)) == set(trainable(reference))
    assert_gradients_match(ours, reference)
    assert any(mask.eq(0).any() for mask in drawn), "dropout dropped something"


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_dropout_keep_drops_at_the_quantized_rate_with_an_unbiased_scale(p):
    keep = torch_ops.dropout_keep((1 << 20,), p, seed=11, device=DEVICE)
    assert keep.dtype == torch.bool
    quantized = torch_ops._quantized(p) / 2**16
    assert abs(quantized - p) <= 2**-17
    # Within 5 standard deviations of the rate; every 16-bit lane of the 64-bit words on its own too (a lane whose
    # top bit were never set would keep everything, or drop half too many).
    for lane in (keep, *keep.view(-1, 4).unbind(1)):
        sigma = (p * (1 - p) / lane.numel()) ** 0.5
        assert abs((~lane).float().mean().item() - quantized) < 5 * sigma
    assert torch_ops.keep_scale(p) * (1 - quantized) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("p", [2**-16, 0.1, 0.5, 0.9])
def test_dropout_keep_drops_exactly_the_quantized_share_of_the_lane_values(p, monkeypatch):
    """Given every 16-bit lane value once, the mask drops exactly ``_quantized(p)`` of them, so the kept values'
    scale makes their expectation exactly one: an off-by-one in the threshold would bias it by 2^-16."""
    every_lane_value = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.int64)
    monkeypatch.setattr(torch_ops, "_random_words", lambda count, seed, device: every_lane_value[:count])
    keep = torch_ops.dropout_keep((2**16,), p, seed=0, device="cpu")
    assert (~keep).sum().item() == torch_ops._quantized(p)
    assert keep.double().mean().item() * torch_ops.keep_scale(p) == 1.0


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        torch_ops.dropout_keep((8,), p, seed=1, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_dropout_scales_kept_values_in_one_rounding(dtype):
    # The scale rounded to bf16 first (1.109375 for 1.1111) would make most kept values differ.
    x = torch.randn(4096, device=DEVICE).to(dtype)
    keep = torch_ops.dropout_keep(x.shape, 0.1, seed=3, device=DEVICE)
    exact = torch.where(keep, (x.double() * torch_ops.keep_scale(0.1)).to(dtype), 0.0)
    assert torch.equal(torch_ops.apply_dropout(x, 0.1, seed=3), exact)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 13), (2, 1, 4, 4)])
def test_dropout_keep_is_drawn_again_from_its_seed(shape):
    first = torch_ops.dropout_keep(shape, 0.5, seed=5, device=DEVICE)
    assert first.shape == shape
    assert torch.equal(first, torch_ops.dropout_keep(shape, 0.5, seed=5, device=DEVICE))
    other_seeds = [torch_ops.dropout_keep((4096,), 0.5, seed=s, device=DEVICE) for s in (5, 6)]
    assert not torch.equal(*other_seeds)
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    expected = x * first * torch_ops.keep_scale(0.5)
    torch.testing.assert_close(torch_ops.apply_dropout(x, 0.5, seed=5), expected, rtol=0, atol=0)


def _dropout_flash_style(q, k, v, mask, p, seed, scale):
    return torch_ops.DropoutAttentionFunction.apply(q, k, v, mask, p, seed, scale)


@pytest.mark.parametrize("attention", [_dropout_flash_style, torch_ops.dropout_attention])
@pytest.mark.parametrize("queries", [7, 1])  # 1: the classification shortcut's first rows
def test_dropout_attention_matches_explicit_attention_on_the_same_mask(attention, queries):
    batch, heads, seq, dim = 2, 3, 7, 5
    q = torch.randn(batch, heads, queries, dim, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, heads, seq, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.zeros(batch, 1, 1, seq, dtype=torch.float64)
    mask[1, ..., 4:] = torch.finfo(torch.float64).min  # padding keys of the second sequence
    out = attention(q, k, v, mask, 0.25, 123, dim**-0.5)
    keep_scale = torch_ops.dropout_scale(torch.empty(batch, heads, queries, seq, dtype=torch.float64), 0.25, 123)
    assert 0 < (keep_scale == 0).float().mean() < 0.5

    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference = torch.softmax(q2 @ k2.transpose(-2, -1) * dim**-0.5 + mask, dim=-1) * keep_scale @ v2
    torch.testing.assert_close(out, reference)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(reference, (q2, k2, v2), dout)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), dout), expected):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("attention", [_dropout_flash_style, torch_ops.dropout_attention])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_attention_in_half_precision_under_autocast_is_as_close_to_fp64_as_sdpa_math(attention, dtype):
    batch, heads, seq, dim = 3, 4, 37, 16
    q, k, v = (torch.randn(batch, heads, seq, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padding = torch.zeros(batch, 1, 1, seq, dtype=torch.bool)
    padding[0, ..., 20:] = True  # the first sequence's padding keys
    keep_scale = torch_ops.dropout_scale(torch.empty(batch, heads, seq, seq, dtype=torch.float64), 0.1, 9)

    def explicit(q, k, v):
        mask = torch.zeros(padding.shape, dtype=q.dtype).masked_fill_(padding, torch.finfo(q.dtype).min)
        return torch.softmax(q @ k.transpose(-2, -1) * dim**-0.5 + mask, dim=-1) * keep_scale.to(q.dtype) @ v

    exact = explicit(q, k, v)
    dout = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, (q, k, v), dout)
    # SDPA's CPU math path on half types: the inputs in fp32, its results rounded once.
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    fp32 = [t.detach().float().requires_grad_() for t in low]
    torch_out = explicit(*fp32)
    torch_results = [torch_out, *torch.autograd.grad(torch_out, fp32, dout.float())]
    mask = torch.zeros(padding.shape, dtype=dtype).masked_fill_(padding, torch.finfo(dtype).min)
    with torch.autocast(DEVICE, dtype=dtype):
        ours = attention(*low, mask, 0.1, 9, dim**-0.5)
    our_results = [ours, *torch.autograd.grad(ours, low, dout.to(dtype))]
    for name, mine, theirs, truth in zip("out dq dk dv".split(), our_results, torch_results, [exact, *exact_grads]):
        assert mine.dtype == dtype, name
        torch_error = (theirs.to(dtype).double() - truth).abs().max()
        assert (mine.double() - truth).abs().max() <= 2 * torch_error + 1e-3, name
    # The output computed in fp32 and rounded once, as SDPA's math path: each value within a unit in the last place
    # of its (scores rounded to the half type first err by several).
    atol = 1e-5 * torch_out.abs().max().item()
    torch.testing.assert_close(ours, torch_out.to(dtype), rtol=torch.finfo(dtype).eps, atol=atol)


@pytest.mark.parametrize("seed", [0, -1, 2**63])  # torch's generators take any of these
def test_dropout_keep_takes_empty_shapes_and_any_seed(seed):
    assert torch_ops.dropout_keep((0, 4), 0.1, seed=seed, device=DEVICE).shape == (0, 4)
    keep = torch_ops.dropout_keep((64,), 0.5, seed=seed, device=DEVICE)
    assert torch.equal(keep, torch_ops.dropout_keep((64,), 0.5, seed=seed, device=DEVICE))
