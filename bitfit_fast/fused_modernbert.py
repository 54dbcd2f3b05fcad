"""ModernBERT's encoder layers and stack on the fused functions, on the batch's real tokens only.

A ModernBERT layer (``families.PreNormGluLayerSpec``: pre-LayerNorm, packed Wqkv, rotary positions, global or
sliding-window attention, GeGLU MLP) whose parts are all BitFit modules becomes ``Fused<LayerClass>``, as a BERT
layer does in ``fused_layer``, with the forward:

    h   = attn_norm(x)                                 Identity in layer 0
    qkv = h @ Wqkv^T + b_qkv                           one GEMM, already packed by the model
    a   = attention(rope(q), rope(k), v)               per sequence; sliding layers see keys within the window
    x1  = x + dropout(a @ Wo^T + b_o)
    u   = mlp_norm(x1) @ Wi^T + b_i                    Wi's rows: [input | gate]
    y   = x1 + dropout(gelu(u_input) * u_gate) @ Wo2^T + b_o2     GeGLU and dropout in Wi's epilogue

The residual stream stays in the layer input's dtype (fp32 under autocast, as in Hugging Face's forward); the
GEMMs run in autocast's dtype. Saved for the backward, by memory mode: "default" q, k, v, the attention output,
both LayerNorms' x_hat with rstd, and u (the GeGLU backward needs both halves); "lean" recomputes u from
mlp_norm's x_hat (one extra Wi GEMM) and, on the torch backend, attention with dropout recomputes its
probabilities; "minimal" also recomputes Wqkv, RoPE and the attention from attn_norm's x_hat. The LayerNorms
normalise the residual stream, so under autocast their x_hat is fp32: those rebuilds are exact, at twice a GEMM
dtype's bytes. Never a weight gradient, a layer input for a weight gradient, or a hidden-state dropout mask.

``ModernBertModel`` becomes ``Fused<ModernBertModel>``: embeddings, then the batch unpadded once (see
``unpadding``), the rotary cos/sin of every real row computed once per attention type, every layer and the final
LayerNorm on the rows, and the output padded once. In a sequence classifier with ``classifier_pooling="cls"``
(``families``: its head reads only each sequence's first token) the last layer runs queries, the attention
output, the MLP and its LayerNorms for each sequence's first row only (keys and values for all rows), as
``fused_layer.FusedEncoder`` does for BERT, and the model returns those rows, final LayerNorm applied, as
[B, 1, d]; with "mean" pooling the head reads every token and the shortcut stays off. Anything the fused path does
not cover (attention weights, hidden states of every layer, 4-D or per-layer masks) runs the original forward,
whose layers then run fused one at a time on the masks Hugging Face built.
"""

import dataclasses

import torch
import torch.nn as nn
import torch.utils.checkpoint

from . import graphs
from .families import PreNormGluLayerSpec, layer_spec
from .functions import Ops, functions, host_seed
from .fused_layer import (
    FusedEncoder,
    FusedEncoderLayer,
    dropout_rate,
    fused_class,
    hooks_inside,
    is_exact_gelu,
    is_fusable_encoder,
    recorded_outputs,
    remember_normalized,
    runs_original_forward,
)
from .modules import (
    BitFitLayerNorm,
    BitFitLinear,
    check_batch,
    is_last_dim_layer_norm,
    replace_children,
    retype,
)
from .torch_ops import compute_dtype, wide
from .unpadding import Tokens


@dataclasses.dataclass
class RotaryRows:
    """What every layer of one forward shares: the real-token layout, each row's rotary (cos, sin) [N, head_dim]
    per attention type, and the window sliding-attention layers apply (None: their mask holds it, or every
    sequence fits in it)."""

    tokens: Tokens
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sliding_window: int | None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's ``apply_rotary_pos_emb`` on rows: x [N, heads·head_dim], cos and sin [N, head_dim]; in fp32
    (:func:`wide`), returned in x's dtype."""
    rows = wide(x.reshape(x.shape[0], heads, -1))
    half = rows.shape[-1] // 2
    rotated = torch.cat((-rows[..., half:], rows[..., :half]), dim=-1)
    return (rows * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype).reshape(x.shape)


def _is_frozen_gamma_norm(norm: nn.Module) -> bool:
    """A LayerNorm the fused functions run: a BitFitLayerNorm, or a bias-free one left as it was (biases="subset"
    without a selected norm)."""
    return isinstance(norm, BitFitLayerNorm) or (is_last_dim_layer_norm(norm) and norm.bias is None)


def _beta(norm: nn.LayerNorm) -> torch.Tensor:
    return norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)


def is_fusable(layer: nn.Module) -> bool:
    """A ModernBERT-style layer (see ``families``) whose linears are BitFit modules (with or without a bias)."""
    spec = layer_spec(type(layer).__name__)
    if not isinstance(spec, PreNormGluLayerSpec):
        return False
    try:
        part = {field.name: layer.get_submodule(getattr(spec, field.name)) for field in dataclasses.fields(spec)}
    except AttributeError:
        return False
    return (
        all(isinstance(part[name], BitFitLinear) for name in ("qkv", "attention_output", "glu_input", "mlp_output"))
        and (isinstance(part["attention_norm"], nn.Identity) or _is_frozen_gamma_norm(part["attention_norm"]))
        and _is_frozen_gamma_norm(part["mlp_norm"])
        and all(isinstance(part[name], (nn.Dropout, nn.Identity)) for name in ("attention_output_dropout",
                                                                               "mlp_dropout"))
        and is_exact_gelu(part["activation"])
        and getattr(layer, "attention_type", None) in ("full_attention", "sliding_attention")
    )


class FusedPreNormLayer(FusedEncoderLayer):
    """Mixin placed before a ModernBERT layer's class; see the module docstring. It subclasses the BERT layer's
    mixin for what they share (the memory modes, the checkpointed attention, merge's ``to_vanilla``); Wqkv is
    packed already, so nothing is repacked."""

    @classmethod
    def fuse(cls, layer: nn.Module, memory: str) -> nn.Module:
        """``layer`` as ``Fused<LayerClass>`` in memory mode ``memory``; Wqkv is one packed weight already."""
        return retype(layer, fused_class(cls, type(layer)), bitfit_memory=memory)

    def to_vanilla(self) -> nn.Module:
        """The layer as its original class again (there is no packed weight to unpack)."""
        plain = retype(self, self.original_class)
        del plain.bitfit_memory
        plain.__dict__.pop("keeps_padding", None)
        return plain

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        """Hugging Face's call of one layer, with the mask it built for this layer's attention type (a sliding
        window included): unpadded within the layer where that mask is a key-padding mask."""
        if (
            runs_original_forward((), kwargs)
            or "attentions" in recorded_outputs(kwargs)
            or position_embeddings is None
            or (attention_mask is not None and attention_mask.dim() != 4)
            or self.trains_a_weight()
            or hooks_inside(self.children())
        ):
            return self.original_class.forward(self, hidden_states, attention_mask, position_embeddings, **kwargs)
        check_batch(hidden_states)
        tokens = Tokens.of_batch(hidden_states, attention_mask, keep_padding=self.keeps_padding)
        rotary = tuple(tokens.pack(t.expand(*hidden_states.shape[:2], -1)) for t in position_embeddings)
        rows = RotaryRows(tokens, {self.attention_type: rotary}, sliding_window=None)
        return tokens.unpack(self.fused_forward(tokens.pack(hidden_states), rows))

    def attention_context(self, h: torch.Tensor, rows: RotaryRows, ops: Ops, first_only: bool = False):
        """Attention of the rows h [N, d] (attn_norm's output) before Wo: [N, d], or [S, d] with ``first_only``
        (queries of each sequence's first row only, rotated at that row's position; keys and values of all rows)."""
        spec = self.spec
        attention, qkv_linear = self.part(spec.attention), self.part(spec.qkv)
        tokens = rows.tokens
        weight, bias = qkv_linear.weight, qkv_linear.trained_bias()
        hidden = weight.shape[0] // 3
        heads = hidden // attention.head_dim
        cos, sin = rows.rotary[self.attention_type]
        if first_only:
            # Biases [3d], or task tables [T, 3d] in a TaskBank (or None): split along the features either way.
            q_bias, kv_bias = (None, None) if bias is None else (bias[..., :hidden], bias[..., hidden:])
            starts = tokens.starts
            q = ops.linear(h.index_select(0, starts), weight[:hidden], q_bias, row_task=tokens.row_tasks(True))
            q = rotate(q, cos.index_select(0, starts), sin.index_select(0, starts), heads)
            kv = ops.linear(h, weight[hidden:], kv_bias, row_task=tokens.row_tasks())
        else:
            qkv = ops.linear(h, weight, bias, row_task=tokens.row_tasks())
            q = rotate(qkv[:, :hidden], cos, sin, heads)
            kv = qkv[:, hidden:]
        kv = torch.cat([rotate(kv[:, :hidden], cos, sin, heads), kv[:, hidden:]], dim=1)
        p = attention.attention_dropout if attention.training else 0.0  # by the attention module's mode, as HF
        window = rows.sliding_window if self.attention_type == "sliding_attention" else None
        keep_probabilities = not ops.is_torch or self.bitfit_memory == "default"
        return tokens.attention(q, kv, heads, p, host_seed(p), attention.head_dim**-0.5, keep_probabilities,
                                first_only, window)

    def fused_forward(self, x: torch.Tensor, rows: RotaryRows, first_only: bool = False) -> torch.Tensor:
        """The layer on x [N, d], the batch's real tokens (the residual stream, kept in x's dtype); [N, d], or
        [S, d] with ``first_only`` (each sequence's first row: the classification shortcut of the last layer)."""
        part = self.part
        spec = self.spec
        attn_norm, mlp_norm = part(spec.attention_norm), part(spec.mlp_norm)
        attention_output, glu_input, mlp_output = part(spec.attention_output), part(spec.glu_input), part(
            spec.mlp_output)
        ops = functions(glu_input.backend, x)
        minimal = self.bitfit_memory == "minimal" and torch.is_grad_enabled()

        rt = rows.tokens.row_tasks()  # attn_norm, k and v: every row
        h = x
        if not isinstance(attn_norm, nn.Identity):
            beta = _beta(attn_norm)
            h, x_hat = ops.layer_norm(x, None, attn_norm.weight, beta, attn_norm.eps, row_task=rt,
                                      out_dtype=compute_dtype(x))
            if minimal:
                remember_normalized(h, x_hat, attn_norm.weight, beta, rt)
        if minimal:
            context = self.checkpointed_attention_context(h, rows, ops, first_only)
        else:
            context = self.attention_context(h, rows, ops, first_only)
        if first_only:  # from here on, each sequence's first row only
            x = x.index_select(0, rows.tokens.starts)
            rt = rows.tokens.row_tasks(first_only=True)
        p_attention = dropout_rate(part(spec.attention_output_dropout))
        x = x + ops.linear(context, attention_output.weight, attention_output.trained_bias(), None, p_attention,
                           ops.dropout_seed(p_attention, x.device), row_task=rt)

        beta = _beta(mlp_norm)
        h, x_hat = ops.layer_norm(x, None, mlp_norm.weight, beta, mlp_norm.eps, row_task=rt,
                                  out_dtype=compute_dtype(x))
        recompute_from = (x_hat, mlp_norm.weight, beta, rt) if self.bitfit_memory != "default" else None
        p_mlp = dropout_rate(part(spec.mlp_dropout))
        gated = ops.linear(h, glu_input.weight, glu_input.trained_bias(), "geglu", p_mlp,
                           ops.dropout_seed(p_mlp, h.device), recompute_from, rt)
        return x + ops.linear(gated, mlp_output.weight, mlp_output.trained_bias(), row_task=rt)


class FusedPreNormEncoder(FusedEncoder):
    """Mixin placed before ``ModernBertModel``: the stack unpadded once; with ``first_token_only`` (set by a
    sequence classifier pooling the first token, see ``FusedEncoder``) and one sequence per batch row, the last
    layer and the final LayerNorm run for each sequence's first row only, returned as [B, 1, d]."""

    @classmethod
    def fuse(cls, encoder: nn.Module) -> nn.Module:
        """``encoder`` as ``Fused<ModernBertModel>``, registered (as Hugging Face registers each model class it
        builds) for the hidden states and attentions its original forward collects."""
        fused = super().fuse(encoder)
        try:
            from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
        except ImportError:  # transformers 4: the layers' outputs are passed back, not collected
            return fused
        # Keyed by the class's name, as every transformers 5 looks it up: 5.17's registry is a plain dict, which
        # keyed by the model itself would leave the fused class unregistered (no hidden states recorded).
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(type(fused)), getattr(fused, "_can_record_outputs", None))
        return fused

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        config = self.config
        if (
            runs_original_forward((), kwargs)
            or recorded_outputs(kwargs)
            or config.output_hidden_states
            or config.output_attentions
            or kwargs.get("return_dict") is False
            or (attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                                or attention_mask.dim() != 2))
            or not all(isinstance(layer, FusedPreNormLayer) for layer in self.layers)
            or any(layer.trains_a_weight() for layer in self.layers)
            or hooks_inside(self.layers)
            or _pads_between_tokens(attention_mask, config.sliding_window)
        ):
            return self.original_class.forward(self, input_ids, attention_mask, position_ids, inputs_embeds,
                                               **kwargs)
        from transformers.modeling_outputs import BaseModelOutput

        hidden = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        check_batch(hidden)
        batch, seq = hidden.shape[:2]
        key_mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        # The caller's position_ids only: ones filled in here would pass for packed sequences in a batch of one row.
        tokens = Tokens.of_batch(hidden, key_mask, position_ids, kwargs.get("cu_seq_lens_q"), self.keeps_padding,
                                 mask_is_padding=True)
        if position_ids is None:
            position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        rotary = {}
        for layer_type in set(config.layer_types):
            cos_sin = self.rotary_emb(hidden, position_ids, layer_type)
            rotary[layer_type] = tuple(tokens.pack(t.expand(batch, seq, -1)) for t in cos_sin)
        window = config.sliding_window if tokens.max_len - 1 > config.sliding_window else None
        rows = RotaryRows(tokens, rotary, window)
        first_only = self.first_token_only and tokens.one_sequence_per_row
        x = tokens.pack(hidden)
        for i, layer in enumerate(self.layers):
            last = first_only and i == len(self.layers) - 1
            if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer.fused_forward, x, rows, last, use_reentrant=False)
            else:
                x = layer.fused_forward(x, rows, last)
        if isinstance(self.final_norm, BitFitLayerNorm):  # the rows are real tokens, not a block per example
            x = self.final_norm(x, row_task=tokens.row_tasks(first_only))
        else:
            x = self.final_norm(x)
        return BaseModelOutput(last_hidden_state=x.unsqueeze(1) if first_only else tokens.unpack(x))


def _pads_between_tokens(attention_mask: torch.Tensor | None, window: int) -> bool:
    """Whether a [B, T] padding mask has padding between two real tokens of a row longer than the sliding window:
    the window counts the row's positions, and the unpadded stack would count the real tokens instead. While a
    CUDA graph captures, the GPU cannot be asked: only a batch declared free of padding is known to have none."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] - 1 <= window:
        return False
    if graphs.capturing():
        return not graphs.declared_without_padding()
    real = attention_mask.bool()
    after_a_token = real.cumsum(dim=1)[:, :-1] > 0
    return bool((after_a_token & ~real[:, :-1] & real[:, 1:]).any())


def fuse_modernbert(model: nn.Module, memory: str) -> None:
    """Fuse every fusable ModernBERT layer of ``model``, and every ModernBertModel whose layers all fused."""
    replace_children(model, lambda m: FusedPreNormLayer.fuse(m, memory) if is_fusable(m) else None)
    replace_children(model, lambda m: FusedPreNormEncoder.fuse(m)
                     if is_fusable_encoder(m, "layers", FusedPreNormLayer) else None)
