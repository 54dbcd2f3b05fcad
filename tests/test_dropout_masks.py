"""With dropout on, the fused torch path computes exactly what reference BitFit computes with the same masks.

The fused path draws its masks itself (from seeds, again in the backward); the reference is Hugging Face's model
with every dropout replaced by a replay of the mask the fused path drew at that place. Masks live on the batch's
real tokens in the fused path (and on each sequence's first row in the last layer: the classification shortcut),
so they are scattered to the padded positions the reference uses; what lands on padding never reaches the logits.
"""

import copy

import pytest
import torch
import transformers.models.bert.modeling_bert as modeling_bert
from bitfit_reference import DEVICE, padded_batch, reference_bitfit, tiny_bert, trainable

import bitfit_fast
from bitfit_fast import torch_ops

P = 0.25  # every dropout of the model: embeddings, attention probabilities, hidden states, classifier


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


# The default memory mode hands attention dropout to scaled_dot_product_attention, whose mask cannot be read back:
# there the attention probabilities keep no dropout, and every other dropout is compared.
@pytest.mark.parametrize("memory,attention_p", [("default", 0.0), ("lean", P), ("minimal", P)])
def test_fused_torch_path_equals_the_reference_applying_the_same_masks(memory, attention_p, monkeypatch):
    base = tiny_bert(hidden_dropout_prob=P, attention_probs_dropout_prob=attention_p, classifier_dropout=P)
    ours = bitfit_fast.apply(copy.deepcopy(base), backend="torch", memory=memory, announce=False).train()
    reference = reference_bitfit(copy.deepcopy(base)).train()
    batch = padded_batch(base, lengths=(7, 1, 5, 7, 3))  # the longest fills the padded width
    valid = batch["attention_mask"].bool()
    layers = base.config.num_hidden_layers

    # The fused path: every mask its ops draw (attention probabilities, then the two hidden-state dropouts of each
    # layer, in order), and the embeddings' and classifier's nn.Dropout masks.
    drawn, recording = [], [True]
    draw = torch_ops.dropout_scale

    def recorded_draw(x, p, seed):
        scale = draw(x, p, seed)
        if recording[0]:
            drawn.append(scale.detach().clone())
        return scale

    monkeypatch.setattr(torch_ops, "dropout_scale", recorded_draw)
    embedding_masks, classifier_masks = [], []
    hooks = [_record_module_dropout(ours.bert.embeddings.dropout, embedding_masks),
             _record_module_dropout(ours.dropout, classifier_masks)]
    out = ours(**batch)
    recording[0] = False
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    per_layer = 3 if attention_p else 2
    assert len(drawn) == per_layer * layers, "an attention mask (with attention dropout) and two hidden-state masks"

    # The reference with those masks in their places.
    probabilities = []
    for layer in range(layers):
        *attention, first_hidden, second_hidden = drawn[per_layer * layer:per_layer * (layer + 1)]
        shortcut = layer == layers - 1 and first_hidden.shape[0] == len(valid)  # the last layer ran first rows only
        full = torch.ones(len(valid), base.config.num_attention_heads, valid.shape[1], valid.shape[1], device=DEVICE)
        if attention:
            full[:, :, :1 if shortcut else None] = attention[0]
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
    ours_grads, reference_grads = trainable(ours), trainable(reference)
    assert set(ours_grads) == set(reference_grads)
    for name, param in reference_grads.items():
        if name.endswith("attention.self.key.bias"):
            assert not ours_grads[name].grad.any(), "the key bias's true gradient is zero"
            continue
        torch.testing.assert_close(ours_grads[name].grad, param.grad, atol=2e-5, rtol=1e-4, msg=name)
    assert any(mask.eq(0).any() for mask in drawn), "dropout dropped something"
