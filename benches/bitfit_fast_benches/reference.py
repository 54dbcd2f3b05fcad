"""Reference BitFit in plain PyTorch: the same Hugging Face model with every weight frozen except the biases and
the task head. The tests check bitfit_fast against it and the benchmarks time it; nothing of bitfit_fast is used.
"""

import copy
import re

import torch.nn as nn


def head_modules(model: nn.Module) -> list[str]:
    """The task head: the top-level modules outside a Hugging Face model's base model (classifier, ...)."""
    prefix = getattr(model, "base_model_prefix", None)
    return [name for name, _ in model.named_children() if name != prefix]


def freeze_for_bitfit(model: nn.Module, head: tuple[str, ...] | list[str] | None = None) -> nn.Module:
    """In place: only the biases and the head's parameters (``head``, default :func:`head_modules`) train."""
    head = set(head_modules(model) if head is None else head)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("bias") or name.split(".")[0] in head)
    return model


def reference_bitfit(model: nn.Module, head: tuple[str, ...] | list[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` made BitFit by :func:`freeze_for_bitfit`."""
    return freeze_for_bitfit(copy.deepcopy(model), head)


# Biases whose true gradient is identically zero: the attention key bias (softmax ignores q·b_k). bitfit_fast gives
# them exactly zero; plain autograd gives rounding noise, which AdamW would turn into lr-sized random steps.
# The key biases of BERT-style models, DistilBERT, ALBERT, MPNet, XLM (and FlauBERT), Funnel and T5 (added, it has
# none), by name: not for models whose attention of these names rotates its keys (RoFormer, ESM with rotary
# positions), where they train.
ZERO_GRADIENT_BIASES = re.compile(
    r"(attention\.self\.key|attention\.k_lin|attention\.key|attention\.attn\.k|attentions\.\d+\.k_lin"
    r"|attention\.k_head|(Self|EncDec)Attention\.k)\.bias$")


def zero_gradient_bias(name: str) -> bool:
    return ZERO_GRADIENT_BIASES.search(name) is not None
