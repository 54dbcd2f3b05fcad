"""The torch backend: the same autograd functions as ``triton_ops``, in plain torch ops.

They compute what BitFit needs and nothing more: no weight or gamma gradient, no saved layer input, no stored
dropout mask (it is drawn again from its seed in the backward).
"""

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's when it is on (as F.linear would), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def bias_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Column sum of a (..., N) gradient, accumulated in fp32, in the dtype of the bias it is for."""
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0, dtype=torch.float32).to(like.dtype)


def dropout_scale(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """keep / (1 - p) for x's shape and dtype, keep drawn from a generator seeded with ``seed``: the backward
    draws the forward's mask again."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    scale = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return scale.ge_(p).mul_(1.0 / (1.0 - p))


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return x * dropout_scale(x, p, seed)


def check_frozen(name: str, tensor: torch.Tensor) -> None:
    if tensor.requires_grad:
        raise RuntimeError(f"the BitFit backward computes no {name} gradient; freeze the {name} first")


class FrozenLinearFunction(torch.autograd.Function):
    """y = dropout(activation(x @ W^T + b)) with W frozen.

    Saves W (a parameter: free) and, with an activation, the pre-activation h; with ``recompute_preact`` it
    saves x instead (free when x is kept anyway, e.g. a LayerNorm output) and recomputes h in the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation=None, dropout_p=0.0, seed=None, recompute_preact=False):
        check_frozen("weight", weight)
        dtype = compute_dtype(x)
        x_c, w_c = x.to(dtype), weight.to(dtype)
        h = F.linear(x_c, w_c, bias.to(dtype) if bias is not None else None)
        y = F.gelu(h) if activation == "gelu" else h
        if dropout_p > 0.0:
            y = apply_dropout(y, dropout_p, seed)
        saved = (x_c if recompute_preact else h) if activation else None
        ctx.save_for_backward(weight, saved)
        ctx.x_dtype = x.dtype
        ctx.bias_like = bias
        ctx.options = (activation, dropout_p, seed, recompute_preact)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, saved = ctx.saved_tensors
        activation, dropout_p, seed, recompute_preact = ctx.options
        w_c = weight.to(dy.dtype)
        g = dy.contiguous()
        if dropout_p > 0.0:
            g = apply_dropout(g, dropout_p, seed)
        if activation == "gelu":
            bias = ctx.bias_like.to(dy.dtype) if ctx.bias_like is not None else None
            h = F.linear(saved, w_c, bias) if recompute_preact else saved
            g = torch.ops.aten.gelu_backward(g, h)
        dx = (g @ w_c).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        db = bias_grad(g, ctx.bias_like) if ctx.needs_input_grad[2] else None
        return dx, None, db, None, None, None, None


class FrozenGammaLayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(x) + residual) over the last dimension with gamma frozen: d(x), d(residual), d(beta).

    Computes in fp32 and returns x's dtype. Saves the output and rstd and rebuilds x_hat = (y - beta) / gamma;
    where gamma has zeros (``gamma_invertible`` False) it saves the normalised input and the mean instead.
    """

    @staticmethod
    def forward(ctx, x, residual, gamma, beta, eps, dropout_p=0.0, seed=None, gamma_invertible=True):
        check_frozen("gamma", gamma)
        s = x.float()
        if dropout_p > 0.0:
            s = apply_dropout(s, dropout_p, seed)
        if residual is not None:
            s = s + residual.float()
        with torch.autocast(x.device.type, enabled=False):
            y, mean, rstd = torch.native_layer_norm(s, (s.shape[-1],), gamma.float(), beta.float(), eps)
        y = y.to(x.dtype)
        if gamma_invertible:
            ctx.save_for_backward(y, gamma, beta, rstd, None)
        else:
            ctx.save_for_backward(s, gamma, beta, rstd, mean)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.options = (dropout_p, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, gamma, beta, rstd, mean = ctx.saved_tensors
        dropout_p, seed = ctx.options
        x_dtype, residual_dtype = ctx.dtypes
        needs_x, needs_residual, _, needs_beta = ctx.needs_input_grad[:4]
        dx = dresidual = dbeta = None
        if needs_x or needs_residual:
            if mean is None:
                x_hat = (saved.float() - beta.float()).div_(gamma.float())
            else:
                x_hat = (saved - mean).mul_(rstd)
            # torch's fused LayerNorm backward on x_hat (mean 0, rstd 1) gives the gradient up to the factor rstd.
            ones = torch.ones_like(rstd)
            ds, _, _ = torch.ops.aten.native_layer_norm_backward(
                dy.float(), x_hat, (x_hat.shape[-1],), torch.zeros_like(rstd), ones, gamma.float(), None,
                [True, False, False],
            )
            ds = ds.mul_(rstd)
            if needs_residual:
                dresidual = ds.to(residual_dtype)
            if needs_x:
                if dropout_p > 0.0:
                    ds = apply_dropout(ds, dropout_p, seed)
                dx = ds.to(x_dtype)
        if needs_beta:
            dbeta = bias_grad(dy, beta)
        return dx, dresidual, None, dbeta, None, None, None, None


def _attention_probabilities(q, k, mask, scale, logsumexp=None):
    """softmax(q k^T * scale + mask) in at least fp32, and its row logsumexp. The dropout mask is drawn in this
    dtype in the forward and the backward alike (torch.rand's stream depends on the dtype)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)).mul_(scale)
    if mask is not None:
        scores.add_(mask)
    if logsumexp is None:
        logsumexp = torch.logsumexp(scores, dim=-1, keepdim=True)
    return scores.sub_(logsumexp).exp_(), logsumexp


class DropoutAttentionFunction(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + mask)) v, as flash attention does it in the backward: it saves q, k, v and
    the row logsumexp, recomputes the probabilities and redraws the dropout mask from its seed.

    For the torch backend's lean memory mode: on CPU, scaled_dot_product_attention with dropout keeps the whole
    probability matrix and mask for every layer, which is faster but far larger. On CUDA, SDPA's own kernels are
    already lean.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, seed, scale):
        probs, logsumexp = _attention_probabilities(q, k, mask, scale)
        out = torch.matmul(apply_dropout(probs, dropout_p, seed).to(v.dtype), v)
        ctx.save_for_backward(q, k, v, mask, logsumexp)
        ctx.options = (dropout_p, seed, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, logsumexp = ctx.saved_tensors
        dropout_p, seed, scale = ctx.options
        probs, _ = _attention_probabilities(q, k, mask, scale, logsumexp)
        keep = dropout_scale(probs, dropout_p, seed)  # drawn once for both uses
        dv = torch.matmul((probs * keep).to(v.dtype).transpose(-2, -1), dout)
        dprobs = torch.matmul(dout, v.transpose(-2, -1)).to(probs.dtype).mul_(keep)
        del keep
        dscores = probs.mul_(dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)).mul_(scale).to(q.dtype)
        dq = torch.matmul(dscores, k)
        dk = torch.matmul(dscores.transpose(-2, -1), q)
        return dq, dk, dv, None, None, None, None
