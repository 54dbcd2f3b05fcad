"""Whole BERT-family encoder layers on the fused functions.

Swapping single modules cannot remove the passes and saved tensors *between* them. A recognised layer (BERT,
RoBERTa, ELECTRA, XLM-R, CamemBERT, ... : post-LayerNorm, exact GELU, absolute positions, no cross-attention)
becomes an instance of ``Fused<LayerClass>``, a subclass of its own class created here (the original class is
untouched, so ``isinstance`` and Hugging Face's output capture still hold), whose forward is:

    qkv = x @ W_qkv^T + b_qkv                     one GEMM; W_qkv packed once, q/k/v weights are views of it
    a   = scaled_dot_product_attention(q, k, v)   flash / memory-efficient kernels, padding mask
    y1  = LayerNorm(dropout(a @ W_o^T + b_o) + x)             dropout + residual + LayerNorm in one pass
    y2  = LayerNorm(dropout(gelu(y1 @ W_i^T + b_i) @ W_2^T + b_2) + y1)

Saved for the backward, by memory mode (T tokens, d hidden, in the GEMM dtype):
  "default"  q, k, v and the attention output (what SDPA needs), the two LayerNorms' normalised inputs x_hat
             with their rstd, and the pre-GELU activation: about 10·T·d values a layer; the fastest backward.
  "lean"     recomputes the pre-GELU activation from the first LayerNorm's output, rebuilt as gamma·x_hat + beta
             from the x_hat that LayerNorm keeps anyway: one extra intermediate GEMM (4·d² per token), about
             6·T·d values a layer. On the torch backend, attention with dropout also recomputes its
             probabilities instead of keeping them (SDPA's CPU path keeps the [B, H, T, T] matrix and mask).
  "minimal"  also recomputes the QKV GEMM and the attention from the layer input, rebuilt the same way from the
             previous layer's last x_hat: 3·d² more per token plus the attention, about 2·T·d values a layer.
No dropout mask, no layer input, no LayerNorm input or output, no weight gradient in any mode. A LayerNorm keeps
x_hat, not its output: rebuilding x_hat = (y - beta) / gamma from the output is unstable where gamma is tiny, and
pretrained LayerNorms have gamma entries near 1e-33; rebuilding y = gamma·x_hat + beta is exact.
The layer's children stay the BitFit modules, so parameter names do not change, and any call the fused path
does not cover (cross-attention, caches, attention weights) runs the original forward on them.
"""

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .modules import BitFitLayerNorm, BitFitLinear, check_batch, functions, retype
from .torch_ops import DropoutAttentionFunction, FrozenLinearFunction, compute_dtype, layer_norm_output

MEMORY_MODES = ("default", "lean", "minimal")

# Layers whose forward is BERT's post-LayerNorm block; the structure is checked as well.
KNOWN_LAYERS = {
    "BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer", "Data2VecTextLayer",
    "LayoutLMLayer", "ErnieLayer",
}

_FUSED_CLASSES: dict[type, type] = {}


def _is_exact_gelu(act: nn.Module | None) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers.activations.GELUActivation: F.gelu or its erf formula in Python, both exact.
    return type(act).__name__ == "GELUActivation"


def is_fusable(layer: nn.Module) -> bool:
    """A known BERT-shaped layer whose parts are all BitFit modules with biases."""
    if type(layer).__name__ not in KNOWN_LAYERS:
        return False
    try:
        sa, so = layer.attention.self, layer.attention.output
        linears = [sa.query, sa.key, sa.value, so.dense, layer.intermediate.dense, layer.output.dense]
        norms = [so.LayerNorm, layer.output.LayerNorm]
        act = layer.intermediate.intermediate_act_fn
        dropouts = [sa.dropout, so.dropout, layer.output.dropout]
    except AttributeError:
        return False
    return (
        all(isinstance(m, BitFitLinear) and m.bias is not None for m in linears)
        and all(isinstance(m, BitFitLayerNorm) for m in norms)
        and all(isinstance(m, nn.Dropout) for m in dropouts)
        and _is_exact_gelu(act)
        and not getattr(layer, "is_decoder", False)
        and not getattr(layer, "add_cross_attention", False)
        and getattr(sa, "position_embedding_type", "absolute") == "absolute"
        and not getattr(layer, "chunk_size_feed_forward", 0)
    )


class _SharedMask:
    """Every layer gets the same boolean [B, 1, T, T] mask from Hugging Face, and SDPA would convert it to an
    additive float mask, and keep that copy for the backward, once per layer. Converting it once per forward
    lets all layers share one copy. Keyed on the mask's identity and version, so it is never stale."""

    def __init__(self):
        self.key = None
        self.value = None

    def __call__(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            return mask.to(dtype)  # already additive (eager attention masks)
        source = self.key[0]() if self.key is not None else None
        if source is not mask or self.key[1:] != (mask._version, dtype):
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            self.value = additive.masked_fill_(~mask, torch.finfo(dtype).min)
            self.key = (weakref.ref(mask), mask._version, dtype)
        return self.value


_shared_mask = _SharedMask()


def _draw_seed(p: float) -> int | None:
    # From torch's CPU generator: reproducible under torch.manual_seed, and no device sync.
    return int(torch.randint(2**31 - 1, (1,)).item()) if p > 0.0 else None


def _remember_normalized(y: torch.Tensor, x_hat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Records on a layer's output the x_hat it was computed from, for the next layer in minimal mode."""
    y.bitfit_normalized = (x_hat, gamma, beta, y._version)


def _normalized_source(x: torch.Tensor) -> tuple | None:
    """(x_hat, gamma, beta) with x == layer_norm_output(x_hat, gamma, beta), if x is such an unmodified output."""
    source = getattr(x, "bitfit_normalized", None)
    return source[:3] if source is not None and source[3] == x._version else None


class FusedEncoderLayer(nn.Module):
    """Mixin placed before the original layer class; see the module docstring."""

    original_class: type
    bitfit_memory: str
    _packed_qkv: torch.Tensor | None

    @classmethod
    def fuse(cls, layer: nn.Module, memory: str) -> nn.Module:
        base = type(layer)
        if base not in _FUSED_CLASSES:
            _FUSED_CLASSES[base] = type(f"Fused{base.__name__}", (cls, base), {"original_class": base})
        fused = retype(layer, _FUSED_CLASSES[base], bitfit_memory=memory, _packed_qkv=None)
        fused.packed_qkv_weight()
        return fused

    def to_vanilla(self) -> nn.Module:
        for linear in self._qkv_linears():  # standalone weights again, not views of the packed one
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        plain = retype(self, self.original_class)
        del plain.bitfit_memory, plain._packed_qkv
        return plain

    def _qkv_linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        sa = self.attention.self
        return sa.query, sa.key, sa.value

    def packed_qkv_weight(self) -> torch.Tensor:
        """[3d, d] weight of the fused QKV GEMM; q/k/v weights are views of it so it is stored once.

        ``model.to(...)`` moves each parameter on its own and breaks the views: the next call packs again.
        """
        weights = [linear.weight for linear in self._qkv_linears()]
        packed = self._packed_qkv
        rows = weights[0].shape[0]
        if packed is None or not all(
            w.device == packed.device and w.dtype == packed.dtype and w.data_ptr() == packed[i * rows].data_ptr()
            for i, w in enumerate(weights)
        ):
            packed = torch.cat([w.detach() for w in weights])
            for i, linear in enumerate(self._qkv_linears()):
                linear.weight = nn.Parameter(packed[i * rows:(i + 1) * rows], requires_grad=False)
            self._packed_qkv = packed
        return packed

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if any(a is not None for a in args) or any(
            kwargs.get(k) for k in ("encoder_hidden_states", "past_key_values", "output_attentions")
        ):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        return self.fused_forward(hidden_states, attention_mask)

    def attention_context(self, x: torch.Tensor, attention_mask: torch.Tensor | None, linear: type) -> torch.Tensor:
        """softmax(q k^T / sqrt(d_head) + mask) v for q, k, v from one packed GEMM; shape of x."""
        sa = self.attention.self
        batch, seq, hidden = x.shape
        qkv_bias = torch.cat([projection.trained_bias() for projection in self._qkv_linears()])
        qkv = linear.apply(x, self.packed_qkv_weight(), qkv_bias)
        q, k, v = qkv.view(batch, seq, 3, sa.num_attention_heads, sa.attention_head_size).permute(2, 0, 3, 1, 4)
        mask = _shared_mask(attention_mask, q.dtype)
        p = sa.dropout.p if self.training else 0.0
        scale = getattr(sa, "scaling", sa.attention_head_size**-0.5)
        if p > 0.0 and linear is FrozenLinearFunction and self.bitfit_memory != "default":
            context = DropoutAttentionFunction.apply(q, k, v, mask, p, _draw_seed(p), scale)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        return context.transpose(1, 2).reshape(batch, seq, hidden)

    def checkpointed_attention_context(self, x, attention_mask, linear: type) -> torch.Tensor:
        """attention_context, recomputed in the backward from the layer input. Where the input is the previous
        layer's output, the checkpoint keeps that layer's x_hat (saved by its LayerNorm anyway) in place of the
        input and rebuilds the input from it; the RNG state is replayed so attention dropout draws the same mask."""
        source = _normalized_source(x)
        if source is None:
            return torch.utils.checkpoint.checkpoint(
                self.attention_context, x, attention_mask, linear, use_reentrant=False
            )

        def keep_source_for_x(tensor):
            return source if tensor is x else tensor

        def rebuild_x(packed):
            return layer_norm_output(*packed) if isinstance(packed, tuple) else packed

        with torch.autograd.graph.saved_tensors_hooks(keep_source_for_x, rebuild_x):
            return torch.utils.checkpoint.checkpoint(
                self.attention_context, x, attention_mask, linear, use_reentrant=False
            )

    def fused_forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        check_batch(x)
        so, out = self.attention.output, self.output
        intermediate = self.intermediate.dense
        linear, layer_norm = functions(intermediate.backend, x)
        x = x.to(compute_dtype(x))
        p_hidden = so.dropout.p if self.training else 0.0
        p_output = out.dropout.p if self.training else 0.0
        minimal = self.bitfit_memory == "minimal" and torch.is_grad_enabled()

        if minimal:
            context = self.checkpointed_attention_context(x, attention_mask, linear)
        else:
            context = self.attention_context(x, attention_mask, linear)

        ln1, ln2 = so.LayerNorm, out.LayerNorm
        h = linear.apply(context, so.dense.weight, so.dense.bias)
        y1, x_hat1 = layer_norm.apply(h, x, ln1.weight, ln1.bias, ln1.eps, p_hidden, _draw_seed(p_hidden))
        recompute_from = (x_hat1, ln1.weight, ln1.bias) if self.bitfit_memory != "default" else None
        a = linear.apply(y1, intermediate.weight, intermediate.bias, "gelu", 0.0, None, recompute_from)
        h = linear.apply(a, out.dense.weight, out.dense.bias)
        y2, x_hat2 = layer_norm.apply(h, y1, ln2.weight, ln2.bias, ln2.eps, p_output, _draw_seed(p_output))
        if minimal:
            _remember_normalized(y2, x_hat2, ln2.weight, ln2.bias)
        return y2

    def extra_repr(self) -> str:
        return f"memory={self.bitfit_memory}"
