"""apply / merge: turn a model into a BitFit model in place, and back into vanilla torch modules."""

import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .backend import check_backend
from .fused_layer import MEMORY_MODES, FusedEncoderLayer, is_fusable
from .modules import BitFitLayerNorm, BitFitLinear, retype

CONFIG_ATTRIBUTE = "bitfit_fast_config"

# biases="subset": the paper's b_q and b_m2 (query and intermediate), by the module names each family uses.
SUBSET_PATTERNS = (
    "attention.self.query",  # BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT, ...
    "intermediate.dense",
    "attention.q_lin",  # DistilBERT
    "ffn.lin1",
    "attention.query",  # ALBERT
    "ffn",
    "attn.Wqkv",  # ModernBERT: q, k and v packed (only the query rows train, see QueryRowsBitFitLinear)
    "mlp.Wi",  # the GLU up-projection (input and gate halves)
)

# Projections that stack q, k and v (in that order) along their output rows: under biases="subset" only the
# query third of their bias trains.
PACKED_QKV_PATTERNS = ("attn.Wqkv",)  # ModernBERT


# Key projections of dot-product self-attention, whose bias has an identically zero gradient (softmax ignores the
# per-query constant q·b_k) as long as positions do not enter through the keys (absolute position embeddings).
ATTENTION_KEY_PATTERNS = (
    "attention.self.key",  # BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT, ...
    "attention.k_lin",  # DistilBERT
    "attention.key",  # ALBERT
)


class QueryRowsBitFitLinear(BitFitLinear):
    """A packed q/k/v projection whose bias trains only in its query rows: the paper's b_q for biases="subset".

    The key and value rows get an exact zero gradient, so AdamW (and its weight decay) leaves them where they
    are: zero for a bias that apply() added.
    """

    query_rows: int

    @classmethod
    def from_packed_qkv(cls, linear: nn.Linear, backend: str) -> "QueryRowsBitFitLinear":
        return retype(linear, cls, backend=backend, zero_bias_grad=False, query_rows=linear.out_features // 3)

    def to_vanilla(self) -> nn.Linear:
        plain = super().to_vanilla()
        del plain.query_rows
        return plain

    def trained_bias(self) -> torch.Tensor | None:
        bias = self.bias
        if bias is None or not bias.requires_grad:
            return bias
        is_query = torch.arange(bias.shape[0], device=bias.device) < self.query_rows
        return torch.where(is_query, bias, bias.detach())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, query_rows={self.query_rows}"


BITFIT_MODULES = (BitFitLinear, BitFitLayerNorm, FusedEncoderLayer)


def _zero_gradient_biases(modules: dict[str, nn.Module]) -> set[int]:
    """ids of the linear modules whose bias gradient is identically zero: the attention key projections."""
    found = set()
    for name, module in modules.items():
        if type(module) is nn.Linear and any(_matches(name, p) for p in ATTENTION_KEY_PATTERNS):
            attention = modules.get(name.rsplit(".", 1)[0])
            if getattr(attention, "position_embedding_type", "absolute") == "absolute":
                found.add(id(module))
    return found


@dataclasses.dataclass
class BitFitConfig:
    """How apply() set a model up; saved beside the biases so load_biases can set up a base model alike."""

    biases: str | list[str]
    train_head: bool
    add_missing_biases: bool
    head: list[str]  # top-level modules of the task head
    added_biases: list[str]  # modules that received a zero bias
    backend: str = "auto"
    fuse_layers: bool = True
    memory: str = "default"
    dtype: str | None = None  # frozen linear weights stored in this dtype ("bfloat16", ...)
    weight_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # their dtypes before apply()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BitFitConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


def config_of(model: nn.Module) -> BitFitConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} is not a bitfit_fast model; call bitfit_fast.apply(model) first"
        )
    return config


def is_applied(model: nn.Module) -> bool:
    return hasattr(model, CONFIG_ATTRIBUTE) or any(isinstance(m, BITFIT_MODULES) for m in model.modules())


def _head_modules(model: nn.Module, head: Sequence[str] | None) -> list[str]:
    """Top-level children outside the Hugging Face base model (classifier, qa_outputs, ...), or as given."""
    children = dict(model.named_children())
    if head is not None:
        unknown = [name for name in head if name not in dict(model.named_modules())]
        if unknown:
            raise ValueError(f"head modules {unknown} not found in {type(model).__name__}")
        return list(head)
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(children.get(prefix), nn.Module):
        return [name for name in children if name != prefix]
    return []


def _within(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches the module's full name or a dotted suffix of it; it may hold glob wildcards."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def _can_take_bias(module: nn.Module, add_missing: bool) -> bool:
    if _has_bias(module):
        return True
    if not add_missing:
        return False
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.LayerNorm and module.weight is not None and len(module.normalized_shape) == 1


def _select_biases(
    candidates: dict[str, nn.Module], biases: str | Sequence[str], model_name: str
) -> list[str]:
    if isinstance(biases, str):
        if biases == "all":
            return list(candidates)
        if biases != "subset":
            raise ValueError(f"biases must be 'all', 'subset' or a list of module-name patterns, got {biases!r}")
        selected = [n for n in candidates if any(_matches(n, p) for p in SUBSET_PATTERNS)]
        if not selected:
            raise ValueError(
                f"biases='subset' found no query/intermediate layers in {model_name} (it knows the names "
                f"{list(SUBSET_PATTERNS)}); pass the module-name patterns of this model as a list instead"
            )
        return selected
    if not isinstance(biases, Sequence) or not biases or not all(isinstance(p, str) for p in biases):
        raise ValueError(f"biases must be 'all', 'subset' or a non-empty list of module-name patterns, got {biases!r}")
    examples = list(candidates)[:4]
    for pattern in biases:
        if not any(_matches(n, pattern) for n in candidates):
            raise ValueError(
                f"bias pattern {pattern!r} matches no module with a bias in {model_name}; names look like {examples}"
            )
    return [n for n in candidates if any(_matches(n, p) for p in biases)]


def _check_untied(model: nn.Module, head: list[str]) -> None:
    body = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if not _within(n, head)}
    for name, param in model.named_parameters(remove_duplicate=False):
        if _within(name, head) and id(param) in body:
            raise ValueError(
                f"the head's {name} is tied to {body[id(param)]}: training the head would train that weight too. "
                "Pass train_head=False (the head's biases then follow `biases`) or untie the weights first."
            )


def _replace_children(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> int:
    """Swap every child for which ``convert`` returns a module; a module shared by several parents (ALBERT)
    is converted once and stays shared. Returns how many distinct modules were converted."""
    converted: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in converted:
                replacement = convert(child)
                if replacement is None:
                    continue
                converted[id(child)] = replacement
            parent._modules[name] = converted[id(child)]
    return len(converted)


def apply(
    model: nn.Module,
    biases: str | Sequence[str] = "all",
    backend: str = "auto",
    train_head: bool = True,
    add_missing_biases: bool | None = None,
    head: Sequence[str] | None = None,
    fuse_layers: bool = True,
    memory: str = "default",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Make ``model`` a BitFit model in place and return it.

    Every parameter is frozen except the selected biases and, with ``train_head``, the task head (found as the
    top-level modules outside a Hugging Face model's base model, or given by ``head``). Every ``nn.Linear`` and
    ``nn.LayerNorm`` outside a trained head becomes a :class:`BitFitLinear` / :class:`BitFitLayerNorm` that
    keeps its parameters, so state_dict keys do not change.

    Args:
        biases: ``"all"`` (every bias outside the head), ``"subset"`` (the paper's query and intermediate
            biases, b_q and b_m2) or a list of module-name patterns (a name, a dotted suffix, or a glob).
        backend: ``"auto"`` (Triton kernels on CUDA tensors, torch ops otherwise), ``"triton"`` or ``"torch"``.
        train_head: train the head fully; if False it is frozen like the body and its biases follow ``biases``.
        add_missing_biases: give selected ``nn.Linear``/``nn.LayerNorm`` modules that have no bias (and the
            trained head's, so the model family's bias flags can declare them after :func:`merge`) a zero one,
            so step 0 computes exactly the pretrained function. ``None`` (the default): only when none of the
            selected encoder modules has a bias (ModernBERT and other bias-free encoders); the count is printed.
        head: names of the head's modules, when the model is not a Hugging Face model with a base model.
        fuse_layers: run recognised encoder layers (BERT, RoBERTa, ELECTRA, XLM-R, ...) as one fused layer
            each (see ``bitfit_fast.fused_layer``); other layers keep the module-level path.
        memory: ``"default"`` saves the pre-GELU activation for the fastest backward; ``"lean"`` recomputes it
            from the LayerNorm output (one extra GEMM per layer) and saves 4 values per token and layer less.
        dtype: store the frozen linear weights once in this dtype (e.g. ``torch.bfloat16``) instead of casting
            them every step under autocast; biases stay fp32 masters. Run the model under ``torch.autocast``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply() takes a torch.nn.Module, got {type(model).__name__}")
    model_name = type(model).__name__
    if is_applied(model):
        raise ValueError(
            f"bitfit_fast is already applied to this {model_name}; call bitfit_fast.merge(model) first to apply "
            "it again with other options"
        )
    check_backend(backend)
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    head_names = _head_modules(model, head)
    if train_head:
        _check_untied(model, head_names)
    # A trained head keeps its modules as they are; a frozen head is treated like the body.
    trained_head = head_names if train_head else []
    modules = {name: m for name, m in model.named_modules() if name and not _within(name, trained_head)}
    if add_missing_biases is None:
        # A bias-free encoder trains zero-initialised biases rather than nothing; a model with biases keeps its own.
        # The encoder decides, not a frozen head's classifier (which has a bias even on ModernBERT).
        selectable = {n: m for n, m in modules.items() if _can_take_bias(m, add_missing=True)}
        chosen = _select_biases(selectable, biases, model_name) if selectable else []
        in_body = [n for n in chosen if not _within(n, head_names)]
        add_missing_biases = bool(chosen) and not any(_has_bias(selectable[n]) for n in in_body or chosen)
    candidates = {n: m for n, m in modules.items() if _can_take_bias(m, add_missing_biases)}
    replaceable = {
        id(m) for m in modules.values()
        if type(m) is nn.Linear or (type(m) is nn.LayerNorm and m.weight is not None and len(m.normalized_shape) == 1)
    }
    if not candidates or not replaceable:
        raise ValueError(
            f"{model_name} has no torch.nn.Linear / torch.nn.LayerNorm with a bias to train: bitfit_fast supports "
            "encoders built from those modules (BERT, RoBERTa, ELECTRA, XLM-R, DistilBERT, ALBERT, ...)"
            + ("" if add_missing_biases else "; add_missing_biases=True gives bias-free layers a zero bias to train")
        )
    selected = _select_biases(candidates, biases, model_name)
    zero_gradient = _zero_gradient_biases(modules)
    query_rows_only = {
        id(candidates[n]) for n in selected
        if biases == "subset" and type(candidates[n]) is nn.Linear and any(_matches(n, p) for p in PACKED_QKV_PATTERNS)
    }
    to_add = [n for n in selected if not _has_bias(candidates[n])]
    if add_missing_biases:  # the trained head's bias-free layers too: they train with the head
        to_add += [n for n, m in model.named_modules()
                   if _within(n, trained_head) and not _has_bias(m) and _can_take_bias(m, add_missing=True)]

    # Validation is over: from here on the model changes.
    for name in to_add:
        module = model.get_submodule(name)
        features = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[0]
        module.bias = nn.Parameter(torch.zeros(features, dtype=module.weight.dtype, device=module.weight.device))
    if to_add:
        count = sum(model.get_submodule(name).bias.numel() for name in to_add)
        print(f"bitfit_fast: added zero biases to {len(to_add)} bias-free layers of {model_name} ({count:,} "
              "parameters), so step 0 computes the pretrained function")
    model.requires_grad_(False)
    if train_head:
        for name in head_names:
            model.get_submodule(name).requires_grad_(True)
    for name in selected:
        candidates[name].bias.requires_grad_(True)

    def to_bitfit(module: nn.Module) -> nn.Module | None:
        if id(module) not in replaceable:
            return None
        if id(module) in query_rows_only:
            return QueryRowsBitFitLinear.from_packed_qkv(module, backend)
        if type(module) is nn.Linear:
            return BitFitLinear.from_linear(module, backend, zero_bias_grad=id(module) in zero_gradient)
        if module.bias is None:  # a bias-free LayerNorm that was not selected: nothing to gain
            return None
        return BitFitLayerNorm.from_layer_norm(module, backend)

    _replace_children(model, to_bitfit)
    weight_dtypes = {}
    if dtype is not None:
        for name, module in model.named_modules():
            if isinstance(module, BitFitLinear) and module.weight.dtype != dtype:
                weight_dtypes[f"{name}.weight"] = str(module.weight.dtype).removeprefix("torch.")
                module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    if fuse_layers:
        _replace_children(model, lambda m: FusedEncoderLayer.fuse(m, memory) if is_fusable(m) else None)
    config = BitFitConfig(
        biases=biases if isinstance(biases, str) else list(biases),
        train_head=train_head,
        add_missing_biases=add_missing_biases,
        head=head_names,
        added_biases=to_add,
        backend=backend,
        fuse_layers=fuse_layers,
        memory=memory,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        weight_dtypes=weight_dtypes,
    )
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def _bias_flags_declaring_added_biases(model: nn.Module) -> list[str]:
    """The config flags (``attention_bias``, ``mlp_bias``, ``norm_bias``, ...) that, turned on, make the model's
    class build exactly its current parameters, biases added by apply() included, so that ``save_pretrained`` →
    ``from_pretrained`` reproduces it. Raises if no set of flags does, before anything changes."""
    config = model.config
    current = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    def built_with(flags: Sequence[str]) -> dict[str, tuple]:
        candidate = copy.deepcopy(config)
        for flag in flags:
            setattr(candidate, flag, True)
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            return {name: tuple(t.shape) for name, t in type(model)(candidate).state_dict().items()}

    original = built_with([])
    added = set(current) - set(original)
    declaring, overreaching = [], {}
    for flag in sorted(k for k, v in config.to_dict().items() if "bias" in k and v is False):
        created = set(built_with([flag])) - set(original)
        if created and created <= added:
            declaring.append(flag)
        elif created & added:
            overreaching[flag] = sorted(created - added)
    rebuilt = built_with(declaring)
    if rebuilt == current:
        return declaring
    if overreaching:
        flag, extra = next(iter(overreaching.items()))
        reason = (f"its flag {flag}=True would also create {extra[0]} (and {len(extra) - 1} more), which apply() "
                  "did not add and from_pretrained would initialise")
    else:
        undeclared = sorted(set(current).symmetric_difference(rebuilt))
        reason = f"no flag of {type(config).__name__} declares {undeclared[:3]} ({len(undeclared)} in all)"
    raise ValueError(
        f"merge() refuses: a save_pretrained checkpoint of this {type(model).__name__} would not reload the biases "
        f"apply() added ({reason}); keep them with bitfit_fast.save_biases(model, dir) and restore them with "
        "bitfit_fast.load_biases(base_model, dir) instead. The model is unchanged."
    )


def merge(model: nn.Module) -> nn.Module:
    """Turn an applied model back into vanilla torch modules, in place, with the trained biases; returns it.

    State_dict keys are those of the original model (plus any bias that ``add_missing_biases`` added, which
    now carries trained values), so Hugging Face's ``save_pretrained`` works on the result: for a Hugging Face
    model with added biases, the family's config flags (``attention_bias``, ``mlp_bias``, ``norm_bias``, ...)
    are turned on to declare them, and a model whose flags cannot declare exactly those biases is refused,
    unchanged (use save_biases / load_biases). ``requires_grad`` flags are left as they are. Weights that
    ``apply(dtype=...)`` stored in low precision get their original dtype back, but keep the rounding: for the
    exact pretrained weights, load the biases onto a fresh base model.
    """
    config = config_of(model)
    from transformers import PreTrainedModel

    declares_biases_in_config = bool(config.added_biases) and isinstance(model, PreTrainedModel)
    flags = _bias_flags_declaring_added_biases(model) if declares_biases_in_config else []
    for flag in flags:
        setattr(model.config, flag, True)
    _replace_children(model, lambda m: m.to_vanilla() if isinstance(m, BITFIT_MODULES) else None)
    for name, original in config.weight_dtypes.items():
        module_name, param_name = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        weight = getattr(module, param_name)
        setattr(module, param_name, nn.Parameter(weight.detach().to(getattr(torch, original)),
                                                 requires_grad=weight.requires_grad))
    if config.weight_dtypes:
        warnings.warn(
            f"merge(): weights stored in {config.dtype} by apply(dtype=...) are back in their original dtype but "
            "rounded to it; for the exact pretrained weights use load_biases on a fresh base model",
            stacklevel=2,
        )
    delattr(model, CONFIG_ATTRIBUTE)
    return model


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = get_nb_trainable_parameters(model)
    percent = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
