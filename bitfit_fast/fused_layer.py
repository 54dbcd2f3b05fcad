"""Whole encoders and their layers on the fused functions, on the batch's real tokens only.

Swapping single modules cannot remove the passes and saved tensors *between* them. A layer of a registered family
(``families``: BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT, DistilBERT, ... : post-LayerNorm, exact GELU, absolute
positions, no cross-attention) becomes an instance of ``Fused<LayerClass>``, a subclass of its own class created
here (the original class is untouched, so ``isinstance`` and Hugging Face's output capture still hold), whose
forward is:

    qkv = x @ W_qkv^T + b_qkv                     one GEMM; W_qkv packed once, q/k/v weights are views of it,
                                                  split into heads as views (``LinearHeadsFunction``)
    a   = scaled_dot_product_attention(q, k, v)   per sequence (see ``unpadding``)
    y1  = LayerNorm(dropout(a @ W_o^T + b_o) + x)             dropout + residual + LayerNorm in one pass
    y2  = LayerNorm(dropout(gelu(y1 @ W_i^T + b_i) @ W_2^T + b_2) + y1)
Each LayerNorm and the linear layer feeding it are one autograd function (``LinearLayerNormFunction``): the
LayerNorm's backward sums b_o's and b_2's gradients from the rows it writes, and those linears' backwards are
plain GEMMs.

Saved for the backward, by memory mode (T tokens, d hidden, in the GEMM dtype):
  "default"  q, k, v and the attention output (what SDPA needs), the two LayerNorms' normalised inputs x_hat
             with their rstd, and the pre-GELU activation: about 10·T·d values a layer; the fastest backward.
  "lean"     recomputes the pre-GELU activation from the first LayerNorm's output, rebuilt as gamma·x_hat + beta
             from the x_hat that LayerNorm keeps anyway: one extra intermediate GEMM (4·d² per token), about
             6·T·d values a layer. On the torch backend, attention with dropout also recomputes its
             probabilities instead of keeping them (SDPA's CPU path keeps the [B, H, T, T] matrix and mask).
  "minimal"  also recomputes the QKV GEMM and the attention from the layer input, rebuilt the same way from the
             previous layer's last x_hat where that is fp32, else kept in the GEMM dtype (under autocast): 3·d²
             more per token plus the attention, about 2·T·d values a layer (3·T·d under autocast).
No hidden-state dropout mask, no layer input, no LayerNorm input or output, no weight gradient in any mode (the
attention probabilities' dropout mask is kept where its probabilities are: "default" on CPU). A LayerNorm keeps
x_hat, not its output: rebuilding x_hat = (y - beta) / gamma from the output is unstable where gamma is tiny, and
pretrained LayerNorms have gamma entries near 1e-33; rebuilding y = gamma·x_hat + beta is stable (exact in fp32;
in half precision within the kept x_hat's rounding, y itself being computed from the fp32 x_hat).

Precision follows torch's: the GEMMs take their operands in the autocast dtype, and the residual stream (the layer
input, y1 and y2) keeps the dtype torch's type promotion gives it, fp32 under autocast, where rounding it to the
GEMM dtype in every layer had 2.8x Hugging Face's error in MiniLM's hidden states under bf16. There y1 and y2 come
with a copy in the GEMM dtype, which the feed-forward GEMM and the next layer's q/k/v GEMM read, written by their
LayerNorm as it writes them; the LayerNorm's backward adds the copy's gradient to the stream's and writes the
feeding GEMM's input gradient in the GEMM dtype (``LinearLayerNormFunction``): no cast passes, no autograd sum.

x is [N, d], the batch's real tokens: the encoder holding the layers becomes ``Fused<EncoderClass>``, which
unpads the batch once (see ``unpadding``), runs the layers on the rows and pads the output once; a layer called
on its own unpads and pads itself. In a model whose head reads only the first token (sequence classification),
the last layer runs for those rows only (``FusedEncoder``).
The layer's children stay the BitFit modules, so parameter names do not change, and any call the fused path
does not cover (cross-attention, caches, attention weights) runs the original forward on them.
"""

import functools
import inspect

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .families import (
    OFFSET_POSITION_EMBEDDINGS,
    EncoderLayerSpec,
    is_fusable_encoder_class,
    layer_spec,
    reads_first_token_only,
    reads_padding,
)
from .functions import Ops, functions, host_seed
from .modules import BitFitLayerNorm, BitFitLinear, check_batch, parameter_like, replace_children, retype
from .torch_ops import compute_dtype, layer_norm_output, layer_norm_output_dtype
from .unpadding import Tokens

MEMORY_MODES = ("default", "lean", "minimal")

_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def fused_class(mixin: type, base: type) -> type:
    """``Fused<Base>``: the mixin placed before the module's own class, made once per class."""
    if (mixin, base) not in _FUSED_CLASSES:
        _FUSED_CLASSES[mixin, base] = type(f"Fused{base.__name__}", (mixin, base),
                                           {"original_class": base, "__reduce_ex__": _reduce_fused})
    return _FUSED_CLASSES[mixin, base]


def _reduce_fused(module: nn.Module, protocol: int):
    """How pickle (torch.save of a whole model, copy.deepcopy) takes a fused module: by its mixin and original
    class, both importable, since ``Fused<Base>`` is made at run time and cannot be found by name."""
    return _new_fused, (type(module).__bases__[0], module.original_class), module.__dict__


def _new_fused(mixin: type, base: type) -> nn.Module:
    """An empty ``Fused<Base>`` for pickle to fill with the module's state."""
    cls = fused_class(mixin, base)
    return cls.__new__(cls)


def dropout_rate(module: nn.Module | None) -> float:
    """The rate a dropout module applies now: its p where it is an nn.Dropout in training mode (its own flag, as
    Hugging Face's layers call it: a model in eval mode with its dropouts in training mode, Monte Carlo dropout,
    drops), else 0."""
    return module.p if isinstance(module, nn.Dropout) and module.training else 0.0


def is_exact_gelu(act: nn.Module | None) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers.activations.GELUActivation: F.gelu or its erf formula in Python, both exact.
    return type(act).__name__ == "GELUActivation"


def is_fusable(layer: nn.Module) -> bool:
    """A layer of a registered family (see ``families``) whose parts are all BitFit modules with biases."""
    spec = layer_spec(type(layer).__name__)
    if not isinstance(spec, EncoderLayerSpec):  # None, or another layout (fused_modernbert)
        return False
    try:
        linears = [layer.get_submodule(path) for path in spec.linears()]
        norms = [layer.get_submodule(path) for path in spec.norms()]
        dropouts = [layer.get_submodule(path) for path in spec.dropouts()]
        act = layer.get_submodule(spec.activation)
        attention = layer.get_submodule(spec.attention)
    except AttributeError:
        return False
    return (
        all(isinstance(m, BitFitLinear) and m.bias is not None for m in linears)
        and all(isinstance(m, BitFitLayerNorm) for m in norms)
        and all(isinstance(m, nn.Dropout) for m in dropouts)
        and is_exact_gelu(act)
        and not getattr(layer, "is_decoder", False)
        and not getattr(layer, "add_cross_attention", False)
        and getattr(attention, "position_embedding_type", "absolute") == "absolute"
        and isinstance(getattr(attention, spec.heads, None), int)
        # BERT chunks in the layer, DistilBERT in its FFN: the fused feed-forward does not chunk.
        and not any(getattr(m, "chunk_size_feed_forward", 0) for m in layer.modules())
    )


def remember_normalized(y: torch.Tensor, x_hat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         row_task: torch.Tensor | None) -> None:
    """Records on a layer's output the x_hat it was computed from, for the next layer in minimal mode."""
    y.bitfit_normalized = (x_hat, gamma, beta, row_task, y.dtype, y._version)


def _normalized_source(x: torch.Tensor) -> tuple | None:
    """(x_hat, gamma, beta, row_task, dtype) with x == layer_norm_output(x_hat, gamma, beta, row_task, dtype), if x is
    such an unmodified output of an fp32 x_hat. An x_hat kept in half precision (under autocast) rebuilds x only
    within its rounding, and a recomputed GEMM must read what the forward's read: the gradient is taken at another
    point otherwise (minimal mode's query-bias gradients reached 3.5x torch's error under bf16)."""
    source = getattr(x, "bitfit_normalized", None)
    exact = source is not None and source[5] == x._version and source[0].dtype == torch.float32
    return source[:5] if exact else None


def _as_module_output(y: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """A fused block's output in the dtype its original returns, the one autocast policy of both layer paths: every
    module gives what torch's would, while inside a fused block the GEMMs' operands are in the autocast dtype. The block
    ends in a LayerNorm of a linear's output plus the block's input [of ``input_dtype``]: under CUDA's autocast torch
    returns it in fp32, under CPU's in the dtype of that sum (see ``layer_norm_output_dtype``)."""
    return y.to(layer_norm_output_dtype(y.device.type, torch.promote_types(y.dtype, input_dtype)))


def runs_original_forward(args: tuple, kwargs: dict) -> bool:
    """Calls the fused path does not cover: cross-attention, caches, attention weights, a head mask (transformers
    4 passes one per layer, None where no head is masked)."""
    head_mask = kwargs.get("head_mask")
    masks_heads = head_mask is not None and (isinstance(head_mask, torch.Tensor)
                                             or any(mask is not None for mask in head_mask))
    return masks_heads or any(a is not None for a in args) or any(
        kwargs.get(k) for k in ("encoder_hidden_states", "past_key_values", "use_cache", "output_attentions")
    )


def _is_output_capture(hook) -> bool:
    """transformers 5's output capture: hooks it leaves on the layers, idle outside a collector (``recorded_outputs``
    sees an active one)."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _sees_output(module: nn.Module) -> bool:
    """Whether a hook reads what ``module`` returns or its gradient: a forward hook (but transformers' idle output
    capture) or a backward one."""
    hooks = module._forward_hooks
    return bool(module._backward_hooks or module._backward_pre_hooks
                or (hooks and not all(map(_is_output_capture, hooks.values()))))


def hooks_inside(modules) -> bool:
    """Whether a hook would be passed over by the fused path, which runs ``modules`` and everything inside them as
    one computation without calling them: a forward or backward hook a user registered (an ablation, a probe, a
    profiler), accelerate's (``_hf_hook``: device placement, offloaded weights) or a global one. The original
    forward then runs, calling every submodule, so each hook fires."""
    from torch.nn.modules import module as torch_module

    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
        return True
    stack = list(modules)
    while stack:  # a plain walk: a few times faster than Module.modules() over BERT-base's 216 submodules
        module = stack.pop()
        if module is None:  # a child slot registered empty
            continue
        if module._forward_pre_hooks or _sees_output(module) or "_hf_hook" in module.__dict__:
            return True
        stack.extend(module._modules.values())
    return False


def recorded_outputs(kwargs: dict) -> set[str]:
    """What Hugging Face collects from inside the model ("hidden_states", "attentions"): transformers 5 does it
    with forward hooks on the layers and attention modules, under a context variable; older versions pass flags."""
    recorded = {key for key in ("hidden_states", "attentions") if kwargs.get(f"output_{key}")}
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return recorded
    return recorded | set(_active_collector.get() or ())


class FusedEncoderLayer(nn.Module):
    """Mixin placed before the original layer class; see the module docstring."""

    original_class: type
    bitfit_memory: str
    _packed_qkv: torch.Tensor | None
    keeps_padding = False  # set by fuse() where the model's loss reads the padding positions (see Tokens.of_batch)

    @classmethod
    def fuse(cls, layer: nn.Module, memory: str) -> nn.Module:
        """``layer`` as ``Fused<LayerClass>`` in memory mode ``memory``, its q/k/v weights packed into one tensor."""
        fused = retype(layer, fused_class(cls, type(layer)), bitfit_memory=memory, _packed_qkv=None)
        fused.packed_qkv_weight()
        return fused

    def to_vanilla(self) -> nn.Module:
        """The layer as its original class again, its q/k/v weights standalone instead of views of the packed one."""
        for linear in self._qkv_linears():  # standalone weights again, not views of the packed one
            linear.weight = parameter_like(linear.weight.detach().clone(), linear.weight,
                                           requires_grad=linear.weight.requires_grad)
        plain = retype(self, self.original_class)
        del plain.bitfit_memory, plain._packed_qkv
        plain.__dict__.pop("keeps_padding", None)
        return plain

    @property
    def spec(self) -> EncoderLayerSpec:
        """Where the layer's parts live: the registered spec of its original class."""
        return layer_spec(self.original_class.__name__)

    def part(self, path: str) -> nn.Module:
        """The submodule at ``path``, one of the spec's (found when the layer was fused), read straight from the
        children: ``get_submodule`` checks each step with hasattr and isinstance, which at ~15 lookups per layer
        per forward took ~5% of a 12-layer step's host time."""
        module = self
        for name in path.split("."):
            module = module._modules[name]
        return module

    def trains_a_weight(self) -> bool:
        """Whether a weight or LayerNorm gain of the layer was unfrozen after apply(). The fused path computes no
        weight gradient (q/k/v even run on a packed copy), so the layer then runs its original forward, whose
        BitFit modules fall back to plain autograd. Eight attribute reads: cheap enough for every forward."""
        for path in self.spec.weighted():
            weight = getattr(self.part(path), "weight", None)
            if weight is not None and weight.requires_grad:
                return True
        return False

    def _qkv_linears(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        spec = self.spec
        return tuple(self.part(path) for path in (spec.query, spec.key, spec.value))

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
            # Kept for every later call: made under torch.inference_mode it would be an inference tensor, which no
            # training step could save for its backward.
            with torch.inference_mode(False):
                packed = torch.cat([w.detach() for w in weights])
                for i, linear in enumerate(self._qkv_linears()):
                    linear.weight = parameter_like(packed[i * rows:(i + 1) * rows], linear.weight,
                                                   requires_grad=False)
            self._packed_qkv = packed
        return packed

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        """Hugging Face's call of one layer: unpadded within the layer (the fused encoder unpads once for all)."""
        if (runs_original_forward(args, kwargs) or "attentions" in recorded_outputs(kwargs)
                or self.trains_a_weight() or hooks_inside(self.children())):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        check_batch(hidden_states)
        # Hugging Face's mask of these bidirectional encoders is the batch's padding.
        tokens = Tokens.of_batch(hidden_states, attention_mask, keep_padding=self.keeps_padding,
                                 mask_is_padding=True)
        y, _ = self.fused_forward(tokens.pack(hidden_states), tokens)
        return _as_module_output(tokens.unpack(y), hidden_states.dtype)

    def attention_context(self, x: torch.Tensor, tokens: Tokens, ops: Ops, first_only: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(d_head) + mask) v, for x [N, d] rows; [N, d], or [S, d] with ``first_only``
        (queries of each sequence's first row only: q from those rows, k and v from all)."""
        attention = self.part(self.spec.attention)
        hidden = x.shape[-1]
        weight = self.packed_qkv_weight()
        # Biases [d], or task tables [T, d] in a TaskBank, where a frozen bias (the key's and value's with
        # biases="subset") stays a vector [d]: every task's row holds it.
        biases = [projection.trained_bias() for projection in self._qkv_linears()]
        tables = [b for b in biases if b.dim() == 2]
        if tables:
            biases = [b if b.dim() == 2 else b.expand(tables[0].shape[0], -1) for b in biases]
        row_task = tokens.row_tasks()
        heads = getattr(attention, self.spec.heads)
        if first_only:
            q = ops.linear(x.index_select(0, tokens.starts), weight[:hidden], biases[0],
                           row_task=tokens.row_tasks(first_only=True))
            q = tokens.query_heads(q, heads, first_only=True)
            k, v = ops.linear_heads(x, weight[hidden:], biases[1:], tokens, heads, row_task)
        else:
            q, k, v = ops.linear_heads(x, weight, biases, tokens, heads, row_task)
        # Hugging Face's attention drops its probabilities by the attention module's mode, at its dropout's p.
        p = self.part(self.spec.attention_dropout).p if attention.training else 0.0
        scale = getattr(attention, "scaling", None) or (hidden // heads) ** -0.5
        keep_probabilities = not ops.is_torch or self.bitfit_memory == "default"
        # The seed is for the torch ops that draw attention's mask where SDPA does not (on CPU, or keeping no
        # probabilities).
        return tokens.attend(q, k, v, p, host_seed(p), scale, keep_probabilities, first_only)

    def checkpointed_attention_context(self, x, tokens, ops: Ops, first_only: bool) -> torch.Tensor:
        """attention_context, recomputed in the backward from the layer input; ``tokens`` is what the layer's
        attention_context takes (``Tokens``; a ModernBERT layer's ``RotaryRows``). Where the input is the previous
        layer's output of an fp32 x_hat, the checkpoint keeps that x_hat (saved by its LayerNorm anyway) in place of
        the input and rebuilds the input from it, exactly; any other input (the embeddings', or any under autocast,
        whose x_hat is rounded) it keeps in the GEMM dtype, the one its GEMMs read it in (an fp32 residual stream
        under autocast would cost twice the bytes). The RNG state is replayed so attention dropout draws the same
        mask."""
        source = _normalized_source(x)
        gemm_dtype = compute_dtype(x)

        def run():
            return torch.utils.checkpoint.checkpoint(
                self.attention_context, x, tokens, ops, first_only, use_reentrant=False
            )

        if source is None and x.dtype == gemm_dtype:
            return run()

        def keep_source_for_x(tensor):
            if tensor is not x:
                return tensor
            return source if source is not None else tensor.to(gemm_dtype)

        def rebuild_x(packed):
            return layer_norm_output(*packed) if isinstance(packed, tuple) else packed

        with torch.autograd.graph.saved_tensors_hooks(keep_source_for_x, rebuild_x):
            return run()

    def fused_forward(self, x: torch.Tensor, tokens: Tokens, first_only: bool = False,
                      x_gemm: torch.Tensor | None = None,
                      gemm_copy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer on x [N, d], the batch's real tokens: (y [N, d], or [S, d] with ``first_only`` (the rows of
        each sequence's first token: the classification shortcut of the last layer), y_gemm). ``x_gemm`` is x in
        the GEMM dtype where the residual stream is wider (the previous layer's y_gemm), None where x is what the
        GEMMs read; with ``gemm_copy`` y_gemm is y's (see ``LinearLayerNormFunction``), for the next layer."""
        part = self.part
        spec = self.spec
        intermediate, output = part(spec.intermediate), part(spec.output)
        ops = functions(intermediate.backend, x)
        p_hidden = 0.0 if spec.attention_output_dropout is None else dropout_rate(part(spec.attention_output_dropout))
        p_output = dropout_rate(part(spec.output_dropout))
        minimal = self.bitfit_memory == "minimal" and torch.is_grad_enabled()

        gemm_input = x if x_gemm is None else x_gemm
        if minimal:
            context = self.checkpointed_attention_context(gemm_input, tokens, ops, first_only)
        else:
            context = self.attention_context(gemm_input, tokens, ops, first_only)
        residual = x.index_select(0, tokens.starts) if first_only else x

        ln1, ln2 = part(spec.attention_norm), part(spec.output_norm)
        attention_output = part(spec.attention_output)
        rt = tokens.row_tasks(first_only)
        y1, x_hat1, y1_gemm = ops.linear_layer_norm(context, attention_output.weight, attention_output.bias, residual,
                                                    ln1.weight, ln1.bias, ln1.eps, p_hidden,
                                                    ops.dropout_seed(p_hidden, x.device), rt, gemm_copy=True)
        recompute_from = (x_hat1, ln1.weight, ln1.bias, rt) if self.bitfit_memory != "default" else None
        a = ops.linear(y1 if y1_gemm is None else y1_gemm, intermediate.weight, intermediate.bias, "gelu",
                       recompute_from=recompute_from, row_task=rt)
        y2, x_hat2, y2_gemm = ops.linear_layer_norm(a, output.weight, output.bias, y1, ln2.weight, ln2.bias, ln2.eps,
                                                    p_output, ops.dropout_seed(p_output, x.device), rt,
                                                    gemm_copy=gemm_copy)
        if minimal:
            remember_normalized(y2, x_hat2, ln2.weight, ln2.bias, rt)
        return y2, y2_gemm

    def extra_repr(self) -> str:
        return f"memory={self.bitfit_memory}"


class FusedEncoder(nn.Module):
    """Mixin placed before an encoder class (a module whose ``layer`` ModuleList holds the layers): it unpads the
    batch once, runs every fused layer on the real tokens and pads the output once (see ``unpadding``).

    ``first_token_only`` is set, for the duration of a forward, by the task model whose head reads only each
    sequence's first token (``families.reads_first_token_only``): the last layer then runs queries, the
    attention output, the feed-forward block and the LayerNorms for those rows only, and the encoder returns
    them as [B, 1, d]. Anything that reads more (hidden states, attention weights, any other head) keeps it off.
    """

    original_class: type
    first_token_only: bool
    keeps_padding = False  # as FusedEncoderLayer's

    @classmethod
    def fuse(cls, encoder: nn.Module) -> nn.Module:
        """``encoder`` as ``Fused<EncoderClass>``, with the classification shortcut off."""
        return retype(encoder, fused_class(cls, type(encoder)), first_token_only=False)

    def to_vanilla(self) -> nn.Module:
        """The encoder as its original class again, without the shortcut flag."""
        plain = retype(self, self.original_class)
        del plain.first_token_only
        plain.__dict__.pop("keeps_padding", None)
        return plain

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        layers = list(self.layer)
        if (
            runs_original_forward(args, kwargs)
            or recorded_outputs(kwargs)
            or not all(isinstance(layer, FusedEncoderLayer) for layer in layers)
            or any(layer.trains_a_weight() for layer in layers)
            or hooks_inside(layers)
        ):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        check_batch(hidden_states)
        tokens = Tokens.of_batch(hidden_states, attention_mask, kwargs.get("position_ids"),
                                 kwargs.get("cu_seq_lens_q"), self.keeps_padding, mask_is_padding=True)
        first_only = self.first_token_only and tokens.one_sequence_per_row
        x = tokens.pack(hidden_states)
        x_gemm = None  # the previous layer's output in the GEMM dtype, where the residual stream is wider
        for i, layer in enumerate(layers):
            last = first_only and i == len(layers) - 1
            arguments = (x, tokens, last, x_gemm, i < len(layers) - 1)
            if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
                x, x_gemm = torch.utils.checkpoint.checkpoint(layer.fused_forward, *arguments, use_reentrant=False)
            else:
                x, x_gemm = layer.fused_forward(*arguments)
        hidden = x.unsqueeze(1) if first_only else tokens.unpack(x)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=_as_module_output(hidden,
                                                                                             hidden_states.dtype))


def _read_first_tokens_only(encoder_path: str, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """The shortcut, unless something else reads the last layer: the hidden states or attentions asked for, or a
    hook on the encoder or a module around it (the base model), which would see [B, 1, d] for [B, T, d]."""
    config = getattr(model, "config", None)
    path = encoder_path.split(".")
    around = (model.get_submodule(".".join(path[:depth])) for depth in range(1, len(path) + 1))
    if not (kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
            or getattr(config, "output_hidden_states", False)) and reads_first_token_only(
                type(model).__name__, config) and not any(map(_sees_output, around)):
        model.get_submodule(encoder_path).first_token_only = True


def _read_all_tokens(encoder_path: str, model: nn.Module, args: tuple, kwargs: dict, output) -> None:
    model.get_submodule(encoder_path).first_token_only = False


def _shift_positions_from_zero(base_model: nn.Module, args: tuple, kwargs: dict):
    """RoBERTa numbers positions from padding_idx + 1; a packed row's position ids, restarting at 0 for each of
    its sequences (DataCollatorWithFlattening's: one row without an attention mask, even for one sequence), are
    shifted there, so that packed sequences mean what they mean padded. The position ids of a batch of several
    rows, or of a row whose attention mask masks padding (never a packed row), are the caller's, taken as given (as
    Hugging Face takes them). A hook on the base model, whose forward sees the mask its embeddings do not."""
    bound = _forward_signature(type(base_model)).bind_partial(base_model, *args, **kwargs)
    position_ids = bound.arguments.get("position_ids")
    if position_ids is None or position_ids.shape[0] != 1 or _masks_padding(bound.arguments.get("attention_mask")):
        return None
    if int(position_ids.min()) != 0:
        return None
    bound.arguments["position_ids"] = position_ids + base_model.embeddings.padding_idx + 1
    return bound.args[1:], bound.kwargs


@functools.cache
def _forward_signature(model_class: type) -> inspect.Signature:
    return inspect.signature(model_class.forward)


def _masks_padding(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask masks a key from every query (padding): [B, T] of 1 and 0 (or bool), or a [B, 1,
    Tq, Tk] mask, boolean or additive (negative where masked), which a block-diagonal mask of packed sequences is
    not."""
    if mask is None:
        return False
    masked = mask < 0 if mask.dim() > 2 and mask.is_floating_point() else mask == 0
    return bool((masked.all(dim=-2) if mask.dim() > 2 else masked).any())


_HOOKS = (_read_first_tokens_only, _read_all_tokens, _shift_positions_from_zero)


def fuse(model: nn.Module, memory: str, first_token_head: bool) -> None:
    """Fuse every fusable layer of ``model`` and every encoder whose layers all fused; with
    ``first_token_head`` (the model's head reads only each sequence's first token), the model's forward turns
    the classification shortcut on in its encoder."""
    from .fused_modernbert import fuse_modernbert  # it builds on this module: imported at first use

    replace_children(model, lambda m: FusedEncoderLayer.fuse(m, memory) if is_fusable(m) else None)
    replace_children(model, lambda m: FusedEncoder.fuse(m) if is_fusable_encoder(m) else None)
    fuse_modernbert(model, memory)
    encoders = [name for name, m in model.named_modules() if isinstance(m, FusedEncoder)]
    if first_token_head and len(encoders) == 1:
        model.register_forward_pre_hook(functools.partial(_read_first_tokens_only, encoders[0]), with_kwargs=True)
        model.register_forward_hook(functools.partial(_read_all_tokens, encoders[0]), with_kwargs=True,
                                    always_call=True)
    if encoders:
        for module in model.modules():
            if type(getattr(module, "embeddings", None)).__name__ in OFFSET_POSITION_EMBEDDINGS:
                module.register_forward_pre_hook(_shift_positions_from_zero, with_kwargs=True)
    if reads_padding(type(model).__name__):
        for module in model.modules():
            if isinstance(module, (FusedEncoderLayer, FusedEncoder)):
                module.keeps_padding = True


def unfuse_hooks(model: nn.Module) -> None:
    """Remove the hooks ``fuse`` installed (found by their functions, so a deep copy's are found too)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "func", hook) in _HOOKS]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


def is_fusable_encoder(module: nn.Module, layers_attribute: str = "layer",
                        layer_class: type = FusedEncoderLayer) -> bool:
    layers = getattr(module, layers_attribute, None)
    return (
        is_fusable_encoder_class(type(module).__name__)
        and isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and all(isinstance(layer, layer_class) for layer in layers)
    )
