"""apply / merge: turn a model into a BitFit model in place, and back into vanilla torch modules."""

import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from .backend import check_backend
from .config import AppliedState, BitFitConfig, dtype_name
from .errors import first_line
from .families import (
    FIRST_TOKEN_HEADS,
    PACKED_QKV_PATTERNS,
    SUBSET_INTERMEDIATE_PATTERNS,
    SUBSET_QUERY_PATTERNS,
    ZERO_GRADIENT_KEYS,
)
from .fused_layer import FusedEncoder, FusedEncoderLayer, fuse, unfuse_hooks
from .modules import (
    BitFitLayerNorm,
    BitFitLinear,
    is_last_dim_layer_norm,
    parameter_like,
    replace_children,
    retype,
)

CONFIG_ATTRIBUTE = "bitfit_fast_config"  # the BitFitConfig a model was applied with
STATE_ATTRIBUTE = "bitfit_fast_state"  # its AppliedState
TRAINED_ATTRIBUTE = "bitfit_fast_trained"  # names of the parameters apply() set to train


class QueryRowsBitFitLinear(BitFitLinear):
    """A packed q/k/v projection whose bias trains only in its query rows: the paper's b_q for biases="subset".

    The key and value rows get an exact zero gradient, so AdamW (and its weight decay) leaves them where they
    are: zero for a bias that apply() added.
    """

    query_rows: int

    @classmethod
    def from_packed_qkv(cls, linear: nn.Linear, backend: str) -> "QueryRowsBitFitLinear":
        """``linear`` (q, k, v stacked along its output rows) as a BitFit linear whose bias trains in its query rows."""
        return retype(linear, cls, backend=backend, zero_bias_grad=False, query_rows=linear.out_features // 3)

    def to_vanilla(self) -> nn.Linear:
        """A plain nn.Linear with the same parameters (see ``BitFitLinear.to_vanilla``)."""
        plain = super().to_vanilla()
        del plain.query_rows
        return plain

    def trained_bias(self) -> torch.Tensor | None:
        """The bias with its key and value rows detached, so they get an exact zero gradient; a frozen bias as it is."""
        bias = self.bias
        if bias is None or not bias.requires_grad:
            return bias
        is_query = torch.arange(bias.shape[-1], device=bias.device) < self.query_rows
        return torch.where(is_query, bias, bias.detach())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, query_rows={self.query_rows}"


BITFIT_MODULES = (BitFitLinear, BitFitLayerNorm, FusedEncoderLayer, FusedEncoder)


def _zero_gradient_biases(modules: dict[str, nn.Module]) -> set[int]:
    """ids of the linear modules whose bias gradient is identically zero: the key projections of the
    registry's attention classes (``families.ZERO_GRADIENT_KEYS``: self-, cross- and block-sparse attention) with
    absolute positions (transformers 4's BERT may add relative ones to the keys, ESM rotary ones)."""
    found = set()
    for attention in modules.values():
        kind = type(attention)
        key_name = ZERO_GRADIENT_KEYS.get(f"{kind.__module__}.{kind.__qualname__}") or ZERO_GRADIENT_KEYS.get(
            kind.__name__)
        key = getattr(attention, key_name, None) if key_name else None
        if type(key) is nn.Linear and getattr(attention, "position_embedding_type", "absolute") == "absolute":
            found.add(id(key))
    return found


def unwrapped(model: nn.Module) -> nn.Module:
    """The model ``torch.compile`` wrapped, or ``model``: the wrapper shares its parameters under names prefixed
    "_orig_mod.", which a checkpoint must not record, and its attributes are the model's."""
    inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else model


def config_of(model: nn.Module) -> BitFitConfig:
    """The options ``model`` was applied with."""
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} is not a bitfit_fast model; call bitfit_fast.apply(model) first"
        )
    return config


def state_of(model: nn.Module) -> AppliedState:
    """What apply() found in and changed about ``model`` (its head, the biases it added, weight dtypes)."""
    config_of(model)
    return getattr(model, STATE_ATTRIBUTE)


def is_applied(model: nn.Module) -> bool:
    """Whether apply() has run on ``model``: its config attribute is set, or it holds a BitFit module."""
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


def _check_head_found(model: nn.Module, head: Sequence[str] | None) -> None:
    """Refuse to guess the head of a module that holds a Hugging Face model without being one (torch.compile's or
    DataParallel's wrapper, an encoder under a head of one's own): its head's weight would stay frozen, silently.
    A Hugging Face base model (BertModel) has no head, and a module without one has none to find."""
    from transformers import PreTrainedModel

    if head is not None or isinstance(model, PreTrainedModel):
        return
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is not None:
        wrapper = any(getattr(model, name, None) is inner for name in ("_orig_mod", "module"))
        hint = ("apply to the model before wrapping it (torch.compile, DataParallel), or " if wrapper else "")
        raise ValueError(f"{type(model).__name__} holds a {type(inner).__name__} but is not a Hugging Face model, so "
                         f"its head cannot be found: {hint}name the modules that train fully with head=[...] "
                         "(head=[] for none), or pass train_head=False")


def is_within(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the parameter or module ``name`` is one of ``prefixes`` (module names) or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches the module's full name or a dotted suffix of it, or names its bias parameter (ending in
    ``.bias``); it may hold glob wildcards."""
    pattern = pattern.removesuffix(".bias")
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def _replaceable(module: nn.Module) -> bool:
    """A module that becomes a BitFit module (and can be given a bias)."""
    return type(module) is nn.Linear or is_last_dim_layer_norm(module)


def _can_take_bias(module: nn.Module, add_missing: bool) -> bool:
    return _has_bias(module) or (add_missing and _replaceable(module))


def _loose_biases(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Bias parameters that a module holds under another name than ``bias`` and adds in its own forward, {full
    name: parameter}: DeBERTa's attention adds ``q_bias`` and ``v_bias`` to a bias-free packed projection,
    ``nn.MultiheadAttention`` has ``in_proj_bias``. Reference BitFit trains every parameter named so."""
    return {f"{name}.{key}": param for name, module in modules.items() for key, param in module._parameters.items()
            if isinstance(param, nn.Parameter) and key != "bias" and key.endswith("bias")}


def _select_biases(candidates: dict[str, nn.Module], biases: str | list[str], model_name: str) -> list[str]:
    """Names of the candidates whose bias trains; the values of ``biases`` are checked by BitFitConfig."""
    if biases == "all":
        return list(candidates)
    if biases == "subset":
        kinds = {"query": SUBSET_QUERY_PATTERNS, "intermediate": SUBSET_INTERMEDIATE_PATTERNS}
        found = {kind: [n for n in candidates if any(_matches(n, p) for p in patterns)]
                 for kind, patterns in kinds.items()}
        if not any(found.values()):
            raise ValueError(
                f"biases='subset' found no query/intermediate layers in {model_name} (it knows the names "
                f"{list(SUBSET_QUERY_PATTERNS + SUBSET_INTERMEDIATE_PATTERNS)}); pass the module-name patterns of "
                "this model as a list instead"
            )
        # Half the paper's subset is another method: refused, not trained silently.
        for kind, other in (("query", "intermediate"), ("intermediate", "query")):
            if not found[kind]:
                raise ValueError(
                    f"biases='subset' found {model_name}'s {other} layers ({found[other][0]}, ...) but no {kind} "
                    f"layer (it knows the names {list(kinds[kind])}): pass the module-name patterns of this model's "
                    "query and intermediate layers as a list instead"
                )
        return [n for n in candidates if n in found["query"] or n in found["intermediate"]]
    examples = list(candidates)[:4]
    for pattern in biases:
        if not any(_matches(n, pattern) for n in candidates):
            raise ValueError(
                f"bias pattern {pattern!r} matches no module with a bias in {model_name}; names look like {examples}"
            )
    return [n for n in candidates if any(_matches(n, p) for p in biases)]


def _check_untied(model: nn.Module, head: list[str]) -> None:
    body = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if not is_within(n, head)}
    for name, param in model.named_parameters(remove_duplicate=False):
        if is_within(name, head) and id(param) in body:
            raise ValueError(
                f"the head's {name} is tied to {body[id(param)]}: training the head would train that weight too. "
                "Pass train_head=False (the head's biases then follow `biases`) or untie the weights first."
            )


def config_with(config: BitFitConfig | None, overrides: dict) -> BitFitConfig:
    """``config`` (default: BitFitConfig()) with ``overrides`` replaced, validated again."""
    if config is None:
        config = BitFitConfig()
    if not isinstance(config, BitFitConfig):
        raise TypeError(
            f"apply()'s config must be a bitfit_fast.BitFitConfig, got {type(config).__name__}; pass options as "
            "keywords instead, e.g. apply(model, biases='subset')"
        )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(BitFitConfig)})
    if unknown:
        raise TypeError(f"apply() got unknown options {unknown}; the options are BitFitConfig's fields")
    return dataclasses.replace(config, **overrides)


def _encoder_is_bias_free(modules: dict[str, nn.Module], head: list[str], biases, model_name: str) -> bool:
    """``add_missing_biases=None``: whether none of the selected modules has a bias, so that a bias-free encoder
    trains zero-initialised biases rather than nothing. The encoder decides, not a frozen head's classifier
    (which has a bias even on ModernBERT)."""
    selectable = {n: m for n, m in modules.items() if _can_take_bias(m, add_missing=True)}
    loose = _loose_biases(modules)
    chosen = _select_biases({**selectable, **loose}, biases, model_name) if selectable or loose else []
    in_body = [n for n in chosen if not is_within(n, head)]
    return bool(chosen) and not any(n in loose or _has_bias(selectable[n]) for n in in_body or chosen)


@dataclasses.dataclass
class _Plan:
    """Everything apply() will change, decided (and so validated) before the model is touched."""

    head: list[str]  # the head's top-level modules
    trained_head: list[str]  # those that train fully: the head with train_head=True, else none
    selected: dict[str, nn.Module]  # modules whose bias trains
    loose: dict[str, nn.Parameter]  # other bias parameters that train, by full name (see _loose_biases)
    to_add: list[str]  # modules that get a zero bias first
    replaceable: set[int]  # ids of the modules that become BitFit modules
    zero_gradient: set[int]  # ids of linears whose bias has an identically zero gradient
    query_rows_only: set[int]  # ids of packed q/k/v projections whose bias trains in its query rows only
    backend: str

    def to_bitfit(self, module: nn.Module) -> nn.Module | None:
        """The BitFit module ``module`` becomes under the plan (for ``replace_children``), or None to keep it."""
        if id(module) not in self.replaceable:
            return None
        if id(module) in self.query_rows_only:
            return QueryRowsBitFitLinear.from_packed_qkv(module, self.backend)
        if type(module) is nn.Linear:
            return BitFitLinear.from_linear(module, self.backend, zero_bias_grad=id(module) in self.zero_gradient)
        if module.bias is None:  # a bias-free LayerNorm that was not selected: nothing to gain
            return None
        return BitFitLayerNorm.from_layer_norm(module, self.backend)


def _plan(model: nn.Module, config: BitFitConfig) -> _Plan:
    model_name = type(model).__name__
    head = _head_modules(model, config.head)
    if config.train_head:
        _check_head_found(model, config.head)
        _check_untied(model, head)
    # A trained head keeps its modules as they are; a frozen head is treated like the body.
    trained_head = head if config.train_head else []
    modules = {name: m for name, m in model.named_modules() if name and not is_within(name, trained_head)}
    add_missing = config.add_missing_biases
    if add_missing is None:
        add_missing = _encoder_is_bias_free(modules, head, config.biases, model_name)
    candidates = {n: m for n, m in modules.items() if _can_take_bias(m, add_missing)}
    loose = _loose_biases(modules)
    replaceable = {id(m) for m in modules.values() if _replaceable(m)}
    if not candidates or not replaceable:
        others = sorted({type(m).__name__ for m in candidates.values() if not _replaceable(m)})
        bias_free = not add_missing and any(_replaceable(m) for m in modules.values())
        raise ValueError(
            f"{model_name} has no torch.nn.Linear / torch.nn.LayerNorm with a bias to train: bitfit_fast supports "
            "encoders built from those modules (BERT, RoBERTa, ELECTRA, XLM-R, DistilBERT, ALBERT, ...)"
            + (f"; its biases are in modules of other kinds ({', '.join(others)}), which it has no fused op for: "
               "train them with plain PyTorch (every other parameter frozen)" if others else
               "; add_missing_biases=True gives bias-free layers a zero bias to train" if bias_free else "")
        )
    chosen = _select_biases({**candidates, **loose}, config.biases, model_name)
    selected = {n: candidates[n] for n in chosen if n in candidates}
    to_add = [n for n, m in selected.items() if not _has_bias(m)]
    if add_missing:  # the trained head's bias-free layers too: they train with the head
        to_add += [n for n, m in model.named_modules()
                   if is_within(n, trained_head) and not _has_bias(m) and _can_take_bias(m, add_missing=True)]
    query_rows_only = set()
    if config.biases == "subset":
        query_rows_only = {id(m) for n, m in selected.items()
                           if type(m) is nn.Linear and any(_matches(n, p) for p in PACKED_QKV_PATTERNS)}
    return _Plan(head=head, trained_head=trained_head, selected=selected,
                 loose={n: loose[n] for n in chosen if n in loose}, to_add=to_add, replaceable=replaceable,
                 zero_gradient=_zero_gradient_biases(modules), query_rows_only=query_rows_only,
                 backend=config.backend)


def _bias_features(module: nn.Module) -> int:
    """The length of the bias apply() gives a bias-free linear or LayerNorm."""
    return module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[0]


def planned_parameters(model: nn.Module, config: BitFitConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """What ``apply(model, config)`` would leave, found without touching the model: every parameter's shape by
    name (the biases it would add included) and the names of those that would train. Raises what apply would."""
    plan = _plan(model, config)
    names = {id(p): name for name, p in model.named_parameters()}  # a tied bias under the one name it is listed as
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes.update({f"{name}.bias": (_bias_features(model.get_submodule(name)),) for name in plan.to_add})
    trained = {name for name in shapes if is_within(name, plan.trained_head)}
    trained |= {f"{n}.bias" if n in plan.to_add else names[id(m.bias)] for n, m in plan.selected.items()}
    trained |= {names[id(param)] for param in plan.loose.values()}
    return shapes, trained


def planned_head(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The head modules ``apply(model, config)`` would train fully (none with ``train_head=False``), found without
    touching the model."""
    return _plan(model, config).trained_head


def planned_bias_owners(model: nn.Module, config: BitFitConfig) -> dict[str, tuple[nn.Module, bool]]:
    """The biases ``apply(model, config)`` would train outside a trained head, {parameter name: (the module that
    adds it, whether apply makes that module a BitFit layer)}: not those of modules other than an ``nn.Linear`` or
    ``nn.LayerNorm`` (a convolution, MobileBERT's NoNorm), nor :func:`_loose_biases`, which their modules add in
    their own forward."""
    plan = _plan(model, config)
    owners = {id(p): m for m in model.modules() for p in m._parameters.values() if p is not None}
    layers = {f"{n}.bias": (m, id(m) in plan.replaceable) for n, m in plan.selected.items()}
    return layers | {name: (owners[id(param)], False) for name, param in plan.loose.items()}


def trained_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters an applied model trains: those apply() set to train, even if frozen since (a
    head frozen for a second stage still holds trained values), and any unfrozen since."""
    config_of(model)
    return set(getattr(model, TRAINED_ATTRIBUTE, ())) | {n for n, p in model.named_parameters() if p.requires_grad}


def _add_zero_biases(model: nn.Module, names: list[str], announce: bool) -> None:
    for name in names:
        module = model.get_submodule(name)
        module.bias = nn.Parameter(torch.zeros(_bias_features(module), dtype=module.weight.dtype,
                                               device=module.weight.device))
    if names and announce:
        count = sum(model.get_submodule(name).bias.numel() for name in names)
        print(f"bitfit_fast: added zero biases to {len(names)} bias-free layers of {type(model).__name__} "
              f"({count:,} parameters), so step 0 computes the pretrained function")


def _freeze_all_but(model: nn.Module, plan: _Plan) -> None:
    model.requires_grad_(False)
    for name in plan.trained_head:
        model.get_submodule(name).requires_grad_(True)
    for module in plan.selected.values():
        module.bias.requires_grad_(True)
    for param in plan.loose.values():
        param.requires_grad_(True)


def _store_frozen_weights(model: nn.Module, dtype: torch.dtype | None) -> dict[str, str]:
    """Frozen linear weights once in ``dtype``; returns their original dtypes by parameter name. A weight the
    linear layers share is converted once and stays shared; one tied to another kind of module (an MLM decoder to
    its word embeddings) stays as it is: converting it would untie them, or change what the embedding returns."""
    original: dict[str, str] = {}
    if dtype is None:
        return original
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attribute, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, attribute))
    converted: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        weight = module.weight if isinstance(module, BitFitLinear) else None
        if weight is None or weight.dtype == dtype or any(not isinstance(owner, BitFitLinear) or attribute != "weight"
                                                          for owner, attribute in owners[id(weight)]):
            continue
        if id(weight) not in converted:
            converted[id(weight)] = parameter_like(weight.detach().to(dtype), weight, requires_grad=False)
        original[f"{name}.weight"] = dtype_name(weight.dtype)
        module.weight = converted[id(weight)]
    return original


def apply(model: nn.Module, config: BitFitConfig | None = None, *, announce: bool = True, **overrides) -> nn.Module:
    """Make ``model`` a BitFit model in place and return it.

    The options are a :class:`BitFitConfig` (``config``; default ``BitFitConfig()``) with any of its fields
    given as keywords replaced: ``apply(model, biases="subset")``, ``apply(model, config, memory="lean")``.
    Every parameter is frozen except the selected biases and, with ``train_head``, the task head (found as the
    top-level modules outside a Hugging Face model's base model, or given by ``head``). Every ``nn.Linear`` and
    ``nn.LayerNorm`` outside a trained head (but a LayerNorm without a bias that gets none) becomes a
    :class:`BitFitLinear` / :class:`BitFitLayerNorm` that keeps its parameters, so state_dict keys do not change;
    recognised encoder layers are fused (``fuse_layers``). Selected modules without a bias get a zero one
    (``add_missing_biases``), so step 0 computes the pretrained function; ``announce`` prints how many
    (``load_biases`` turns it off: the biases it restores are not zero). Nothing changes until every option and the
    model have been checked.
    The config is kept as ``model.bitfit_fast_config``; what apply() found and changed as
    ``model.bitfit_fast_state`` (:class:`AppliedState`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply() takes a torch.nn.Module, got {type(model).__name__}")
    if is_applied(model):
        raise ValueError(
            f"bitfit_fast is already applied to this {type(model).__name__}; call bitfit_fast.merge(model) first "
            "to apply it again with other options"
        )
    config = config_with(config, overrides)
    check_backend(config.backend)
    plan = _plan(model, config)

    # Validation is over: from here on the model changes.
    _add_zero_biases(model, plan.to_add, announce)
    _declare_added_biases(model, plan.to_add, announce)
    _freeze_all_but(model, plan)
    if announce:
        _warn_of_frozen_weights_not_loaded(model)
    setattr(model, TRAINED_ATTRIBUTE, frozenset(n for n, p in model.named_parameters() if p.requires_grad))
    replace_children(model, plan.to_bitfit)
    weight_dtypes = _store_frozen_weights(model, config.dtype)
    if config.fuse_layers:
        fuse(model, config.memory, first_token_head=type(model).__name__ in FIRST_TOKEN_HEADS)
    setattr(model, CONFIG_ATTRIBUTE, config)
    setattr(model, STATE_ATTRIBUTE, AppliedState(head=plan.head, added_biases=plan.to_add,
                                                 weight_dtypes=weight_dtypes))
    return model


class FrozenNewWeightsWarning(UserWarning):
    """Frozen weights that from_pretrained initialized at random: save_biases does not keep them."""


def weights_drawn_at_random(model: nn.Module) -> set[str]:
    """Names of the parameters that ``from_pretrained`` did not find in the checkpoint and initialized at random (a
    pooler that a sentence-embedding checkpoint lacks, a new classifier). Transformers 5 marks the parameters it
    loaded; a model none of whose parameters is marked (built from a config, copied, or loaded by transformers 4)
    has none."""
    params = dict(model.named_parameters())
    if not any(getattr(p, "_is_hf_initialized", False) for p in params.values()):
        return set()
    return {name for name, p in params.items() if not getattr(p, "_is_hf_initialized", False)}


def _warn_of_frozen_weights_not_loaded(model: nn.Module) -> None:
    """Warn of frozen weights drawn at random (:func:`weights_drawn_at_random`): a base loaded again draws other
    values, so the model could not be restored from its saved biases."""
    modules = sorted({name.rsplit(".", 1)[0] for name in weights_drawn_at_random(model)
                      if not model.get_parameter(name).requires_grad})
    if modules:
        warnings.warn(
            f"apply(): {modules} of this {type(model).__name__} were not in the checkpoint (from_pretrained "
            "initialized them at random) and stay frozen; save_biases keeps no frozen weight, so a base loaded again "
            "draws other values and the trained model cannot be restored: train them with the head, "
            "head=[...] naming them beside its modules (bitfit-fast train does so)", FrozenNewWeightsWarning,
            stacklevel=3)


class UndeclaredBiasesWarning(UserWarning):
    """Biases apply() added that a save_pretrained checkpoint of the applied model cannot reload."""


def _declare_added_biases(model: nn.Module, added, announce: bool) -> None:
    """Turns on the config flags that declare exactly the biases apply() added (see
    :func:`_bias_flags_declaring_added_biases`), so that ``save_pretrained`` of the applied model (every checkpoint
    the Hugging Face Trainer writes) reloads them into the vanilla class. The flags go on a copy of the config,
    which the model's modules then share: another model built from the caller's config object keeps its own flags.
    Where no flags can declare them, the config is left as it is, with a warning where apply() ``announce``s
    (load_biases and TaskBank apply without: their biases come from save_biases already), and merge() refuses."""
    from transformers import PreTrainedModel

    if not added or not isinstance(model, PreTrainedModel):
        return
    try:
        flags = _bias_flags_declaring_added_biases(model)
    except ValueError:
        if not announce:
            return
        warnings.warn(
            f"apply(): the {len(added)} biases added to this {type(model).__name__} cannot be declared by its config "
            "flags, so save_pretrained (every Hugging Face Trainer checkpoint) writes them but from_pretrained drops "
            "them: keep the trained values with bitfit_fast.save_biases(model, dir) and restore them onto a base "
            "model with bitfit_fast.load_biases", UndeclaredBiasesWarning, stacklevel=3)
        return
    config = own_config(model)
    for flag in flags:
        setattr(config, flag, True)


def own_config(model: nn.Module):
    """The model's config as an object of its own, which its modules then share: a config object a caller built
    several models from is not changed for the others when this one's flags or class names change."""
    shared, own = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own
    return own


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
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated or initialised
                return {name: tuple(t.shape) for name, t in type(model)(candidate).state_dict().items()}
        except Exception as error:  # e.g. a subclass whose __init__ takes more than the config
            raise ValueError(f"merge() refuses: this {type(model).__name__} cannot be built again from its config "
                             f"alone ({type(error).__name__}: {first_line(error)}), so no config flag can be shown to "
                             "declare the biases apply() added; keep them with bitfit_fast.save_biases(model, dir) "
                             "and restore them with bitfit_fast.load_biases(base_model, dir) instead. The model is "
                             "unchanged.") from error

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


def task_table_layers(model: nn.Module) -> list[str]:
    """The layers whose bias is a TaskBank's task table [T, N]: none but in a bank's model."""
    return [name for name, module in model.named_modules()
            if isinstance(module, BitFitLinear | BitFitLayerNorm) and getattr(module.bias, "ndim", 1) == 2]


def merge(model: nn.Module) -> nn.Module:
    """Turn an applied model back into vanilla torch modules, in place, with the trained biases; returns it.

    State_dict keys are those of the original model (plus any bias that ``add_missing_biases`` added, which
    now carries trained values), so Hugging Face's ``save_pretrained`` works on the result: for a Hugging Face
    model with added biases, the family's config flags (``attention_bias``, ``mlp_bias``, ``norm_bias``, ...)
    are turned on to declare them, and a model whose flags cannot declare exactly those biases is refused,
    unchanged (use save_biases / load_biases). ``requires_grad`` flags are left as they are. Weights that
    ``apply(dtype=...)`` stored in low precision get their original dtype back, but keep the rounding: for the
    exact pretrained weights, apply a fresh base model with ``dtype=None`` and load the biases onto it.
    """
    given, model = model, unwrapped(model)
    config, state = config_of(model), state_of(model)
    tables = task_table_layers(model)
    if tables:  # a vanilla layer would hold every task's biases as one [T, N] bias
        raise ValueError(f"this model is a TaskBank's (its biases are task tables, {tables[0]}'s among them): merge "
                         "one task's model instead: bank.save_task(name, directory), then load_biases onto a fresh "
                         "applied base model and merge that")
    from transformers import PreTrainedModel

    declares_biases_in_config = bool(state.added_biases) and isinstance(model, PreTrainedModel)
    flags = _bias_flags_declaring_added_biases(model) if declares_biases_in_config else []
    for flag in flags:
        setattr(model.config, flag, True)
    unfuse_hooks(model)
    replace_children(model, lambda m: m.to_vanilla() if isinstance(m, BITFIT_MODULES) else None)
    _restore_weight_dtypes(model, state.weight_dtypes)
    if state.weight_dtypes:
        warnings.warn(
            f"merge(): weights stored in {dtype_name(config.dtype)} by apply(dtype=...) are back in their original "
            "dtype but rounded to it; for the exact pretrained weights apply a fresh base model with dtype=None and "
            "load_biases onto it",
            stacklevel=2,
        )
    for attribute in (CONFIG_ATTRIBUTE, STATE_ATTRIBUTE, TRAINED_ATTRIBUTE):
        model.__dict__.pop(attribute, None)  # the last is missing on a model applied by an earlier version
    return given


def _restore_weight_dtypes(model: nn.Module, weight_dtypes: dict[str, str]) -> None:
    restored: dict[int, nn.Parameter] = {}  # a weight shared by several layers is restored once, still shared
    for name, original in weight_dtypes.items():
        module_name, param_name = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        weight = getattr(module, param_name)
        if id(weight) not in restored:
            restored[id(weight)] = parameter_like(weight.detach().to(getattr(torch, original)), weight,
                                                  requires_grad=weight.requires_grad)
        setattr(module, param_name, restored[id(weight)])


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a parameter shared by several modules counts once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"counting parameters takes a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's line)."""
    trainable, total = get_nb_trainable_parameters(model)
    percent = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
