"""DeBERTa-v2/v3's relative positions in a TaskBank: each example's own task's positional keys and queries.

DeBERTa projects its relative-position embeddings with the attention's key and query projections (or, without
``share_att_key``, projections of their own) after a LayerNorm and a dropout: pos = W·dropout(LN(E) + β) + b. Those
rows are positions, not examples, so the bank's per-row task biases cannot reach them; yet β and b are trained
biases, and each task has its own. By linearity, task t's projection is the shared W·LN₀(E) (LN₀: without a task's
β) plus a constant vector c_t = W·β_t + b_t: the bank projects the positions once and adds each example's c_t,
where Hugging Face repeats one projection for every example. Only while the position dropout is active and β is a
task table does β_t not factor out (the mask multiplies it): then each task of the batch has its positions dropped
out and projected on their own, min(B, T) projections for a batch of B examples (per-task runs draw a mask each
too).

:func:`install` puts this in place on the bank's applied model, instance by instance (their classes become
subclasses of Hugging Face's, made on first use): the encoder's ``get_rel_embedding`` returns LN₀(E) (its
LayerNorm's β, a table, left to the attention), and each attention's ``disentangled_attention_bias`` computes the
content-to-position and position-to-content scores as Hugging Face's does, from each example's own positional keys
and queries. The attention's position dropout moves inside it (it must see β_t too).
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import task_rows

_DEBERTA_V2 = "transformers.models.deberta_v2.modeling_deberta_v2"


def _is(module: nn.Module, class_name: str) -> bool:
    return type(module).__name__ == class_name and type(module).__module__ == _DEBERTA_V2


def _relative_attentions(model: nn.Module):
    """(encoder name, encoder, [(attention name, attention)]) of each DeBERTa-v2 encoder with relative attention."""
    for name, encoder in model.named_modules():
        if _is(encoder, "DebertaV2Encoder") and encoder.relative_attention:
            yield name, encoder, [(f"{name}.{n}" if name else n, m) for n, m in encoder.named_modules()
                                  if _is(m, "DisentangledSelfAttention") and m.relative_attention]


def positional_layers(model: nn.Module) -> set[str]:
    """Names of the layers that see positions only, never an example's rows (the relative embeddings' LayerNorm,
    the positional projections of attentions that do not share the key's): :func:`install` handles them."""
    names = set()
    for name, encoder, attentions in _relative_attentions(model):
        if "layer_norm" in encoder.norm_rel_ebd:
            names.add(f"{name}.LayerNorm" if name else "LayerNorm")
        for attention_name, attention in attentions:
            if not attention.share_att_key:
                names.update(f"{attention_name}.{projection}" for projection in ("pos_key_proj", "pos_query_proj")
                             if hasattr(attention, projection))
    return names


def check_supported(model: nn.Module) -> None:
    """Raise, before the model changes, unless this transformers has the DeBERTa-v2 attention :func:`install`
    computes as (4.47 and later: its position helpers take the layers, its position dropout is an nn.Dropout)."""
    found = list(_relative_attentions(model))
    if not found:
        return
    from transformers.models.deberta_v2 import modeling_deberta_v2 as deberta

    helpers = all(hasattr(deberta, name) for name in ("build_rpos", "scaled_size_sqrt"))
    if not helpers or any(not isinstance(attention.pos_dropout, nn.Dropout)
                          for _, _, attentions in found for _, attention in attentions):
        import transformers

        raise ValueError(f"a TaskBank gives DeBERTa-v2's relative positions each task's biases as transformers 4.47 "
                         f"and later compute them; this is transformers {transformers.__version__}: upgrade it "
                         "(pip install -U transformers)")


def install(model: nn.Module) -> None:
    """Per-task relative positions in every DeBERTa-v2 encoder of the bank's applied ``model`` (see above)."""
    for _, encoder, attentions in _relative_attentions(model):
        norm = encoder.LayerNorm if "layer_norm" in encoder.norm_rel_ebd else None
        encoder.__class__ = _subclasses()["TaskBankDebertaV2Encoder"]
        for _, attention in attentions:
            # Plain attributes, not submodules: the encoder owns the LayerNorm, and a dropout kept here is no state.
            attention.__dict__["_task_positions"] = (norm, attention.pos_dropout.p)
            attention.pos_dropout = nn.Identity()
            attention.__class__ = _subclasses()["TaskBankDisentangledSelfAttention"]


@functools.cache
def _subclasses() -> dict[str, type]:
    """The classes :func:`install` gives DeBERTa-v2's encoder and attentions, made once transformers is imported;
    this module's ``__getattr__`` finds them by name, as pickle does."""
    from transformers.models.deberta_v2 import modeling_deberta_v2 as deberta

    return {
        "TaskBankDebertaV2Encoder": type("TaskBankDebertaV2Encoder", (deberta.DebertaV2Encoder,), {
            "__module__": __name__, "get_rel_embedding": _get_rel_embedding}),
        "TaskBankDisentangledSelfAttention": type("TaskBankDisentangledSelfAttention",
                                                  (deberta.DisentangledSelfAttention,), {
            "__module__": __name__, "disentangled_attention_bias": _disentangled_attention_bias}),
    }


def __getattr__(name: str):
    if name in ("TaskBankDebertaV2Encoder", "TaskBankDisentangledSelfAttention"):
        return _subclasses()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _table(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias that is a task table [T, N], or None."""
    return bias if bias is not None and bias.dim() == 2 else None


def _get_rel_embedding(encoder) -> torch.Tensor:
    """The relative embeddings as every task shares them: normalised with the LayerNorm's gain, and with its β
    unless β is a task table (then the attention adds each task's)."""
    embeddings = encoder.rel_embeddings.weight
    if "layer_norm" not in encoder.norm_rel_ebd:
        return embeddings
    norm = encoder.LayerNorm
    beta = None if _table(norm.bias) is not None else norm.bias
    return F.layer_norm(embeddings, norm.normalized_shape, norm.weight, beta, norm.eps)


def _batch_tasks(tasks: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch's tasks, each once and in order, padded with task T - 1 to K = min(B, T) of them: [K]; each
    example's place among them: [B]), for the examples' tasks ``tasks`` [B], without reading them on the host."""
    slots = min(len(tasks), num_tasks)
    if slots == num_tasks:
        return torch.arange(num_tasks, device=tasks.device), tasks
    present = torch.zeros(num_tasks, dtype=torch.bool, device=tasks.device).index_fill_(0, tasks, True)
    ids = torch.arange(num_tasks, device=tasks.device)
    held = torch.sort(torch.where(present, ids, num_tasks)).values[:slots].clamp_(max=num_tasks - 1)
    return held, (torch.cumsum(present, 0) - 1)[tasks]


def _positions(attention, rel: torch.Tensor, rel_tasks: torch.Tensor, beta: torch.Tensor | None,
               projection: nn.Linear, tasks: torch.Tensor) -> torch.Tensor:
    """``projection`` of the (dropped-out) relative embeddings for each example's task, in the attention's head
    layout [B·H, P, d] (Hugging Face's repeats one [H, P, d] for every example). ``rel``: [K, P, H] of tasks
    ``rel_tasks`` [K], their β_t in it, ``tasks`` each example's place among them; or [P, H] shared, with ``beta``
    the LayerNorm's task table if it is one and ``tasks`` each example's task."""
    table = _table(projection.bias)
    out = F.linear(rel, projection.weight, None if table is not None else projection.bias)
    if rel.dim() == 3:
        out = (out if table is None else out + table[rel_tasks][:, None, :].to(out.dtype))[tasks]
    else:  # + c_t = W·β_t + b_t
        constant = None if beta is None else F.linear(beta.to(out.dtype), projection.weight.to(out.dtype))
        if table is not None:
            constant = table.to(out.dtype) if constant is None else constant + table.to(out.dtype)
        out = out.expand(len(tasks), *out.shape) if constant is None else out + constant[tasks][:, None, :]
    return attention.transpose_for_scores(out, attention.num_attention_heads)


def _disentangled_attention_bias(self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
    """Hugging Face's ``DisentangledSelfAttention.disentangled_attention_bias`` with each example's task's
    positional keys and queries."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import (
        build_relative_position,
        build_rpos,
        scaled_size_sqrt,
    )

    tasks = task_rows.required("attention").to(query_layer.device)
    if relative_pos is None:
        relative_pos = build_relative_position(query_layer, key_layer, bucket_size=self.position_buckets,
                                               max_position=self.max_relative_positions)
    if relative_pos.dim() == 2:
        relative_pos = relative_pos.unsqueeze(0).unsqueeze(0)
    elif relative_pos.dim() == 3:
        relative_pos = relative_pos.unsqueeze(1)
    elif relative_pos.dim() != 4:
        raise ValueError(f"Relative position ids must be of dim 2 or 3 or 4. {relative_pos.dim()}")
    span = self.pos_ebd_size
    relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)

    norm, dropout = self._task_positions
    rel = rel_embeddings[:span * 2, :]
    beta = _table(norm.bias) if norm is not None else None
    rel_tasks = None
    if beta is not None and self.training and dropout > 0:  # β_t is dropped out with the positions: each task's own
        rel_tasks, tasks = _batch_tasks(tasks, beta.shape[0])
        rel = F.dropout(rel + beta[rel_tasks][:, None, :].to(rel.dtype), dropout, training=True)
        beta = None
    else:
        rel = F.dropout(rel, dropout, training=self.training)
    key_projection = self.key_proj if self.share_att_key else getattr(self, "pos_key_proj", None)
    query_projection = self.query_proj if self.share_att_key else getattr(self, "pos_query_proj", None)

    score = 0
    if "c2p" in self.pos_att_type:
        pos_key_layer = _positions(self, rel, rel_tasks, beta, key_projection, tasks)
        scale = scaled_size_sqrt(pos_key_layer, scale_factor)
        c2p_att = torch.bmm(query_layer, pos_key_layer.transpose(-1, -2))
        c2p_pos = torch.clamp(relative_pos + span, 0, span * 2 - 1)
        c2p_att = torch.gather(c2p_att, dim=-1, index=c2p_pos.squeeze(0).expand(
            [query_layer.size(0), query_layer.size(1), relative_pos.size(-1)]))
        score += c2p_att / scale.to(dtype=c2p_att.dtype)
    if "p2c" in self.pos_att_type:
        pos_query_layer = _positions(self, rel, rel_tasks, beta, query_projection, tasks)
        scale = scaled_size_sqrt(pos_query_layer, scale_factor)
        r_pos = build_rpos(query_layer, key_layer, relative_pos, self.max_relative_positions, self.position_buckets)
        p2c_pos = torch.clamp(-r_pos + span, 0, span * 2 - 1)
        p2c_att = torch.bmm(key_layer, pos_query_layer.transpose(-1, -2))
        p2c_att = torch.gather(p2c_att, dim=-1, index=p2c_pos.squeeze(0).expand(
            [query_layer.size(0), key_layer.size(-2), key_layer.size(-2)])).transpose(-1, -2)
        score += p2c_att / scale.to(dtype=p2c_att.dtype)
    return score
