"""``fastbert.optimize``: put fastbert's encoder into an existing transformers or
sentence-transformers model, sharing its weights."""

from __future__ import annotations

import copy
import inspect

import torch
import transformers
from torch import nn
from transformers.utils import logging

from .modeling_bert import BertModel
from .validation import check_config

logger = logging.get_logger(__name__)


def to_fastbert(hf_model: transformers.BertModel) -> BertModel:
    """A fastbert.BertModel that shares every leaf module (Linear, Embedding, LayerNorm, Dropout: so
    every weight) of a transformers one.

    Modules are shared, not copied: optimizers, tied weights, PEFT adapters on query / value and
    later ``.to()`` calls keep working on the same parameters. The container modules are fastbert's
    (hooks on transformers' are not carried over: a warning names them).
    """
    with torch.device("meta"):  # the skeleton only; its leaves are replaced below
        model = BertModel(hf_model.config, add_pooling_layer=hf_model.pooler is not None)
    for name, leaf in list(model.named_modules()):
        if name and not any(True for _ in leaf.children()):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, hf_model.get_submodule(name))
    for name in ("position_ids", "token_type_ids"):
        buffer = getattr(hf_model.embeddings, name, None)
        if buffer is None:  # versions of transformers without these buffers
            buffer = getattr(_fresh_buffers(hf_model), name)
        model.embeddings.register_buffer(name, buffer, persistent=False)
    # Each module keeps the training flag it had (a user may have put one dropout in eval mode), and
    # each layer its gradient checkpointing (gradient_checkpointing_enable() before the swap).
    hf_modules = dict(hf_model.named_modules())
    for name, module in model.named_modules():
        if name in hf_modules:
            module.training = hf_modules[name].training
            if hasattr(module, "gradient_checkpointing"):
                for attr in ("gradient_checkpointing", "_gradient_checkpointing_func"):
                    if attr in vars(hf_modules[name]):
                        setattr(module, attr, vars(hf_modules[name])[attr])
    _warn_of_dropped_hooks(hf_model, model)
    return model


def _warn_of_dropped_hooks(hf_model: nn.Module, model: BertModel) -> None:
    """Hooks (or a replaced ``forward``) on transformers' container modules do not come along: only
    the leaf modules (Linear, Embedding, LayerNorm, Dropout) are shared, the containers are fastbert's,
    and their inputs and outputs differ (packed tokens). Say so, naming them, rather than drop them
    silently."""
    shared = {id(m) for m in model.modules()}
    dropped = [name or type(hf_model).__name__ for name, m in hf_model.named_modules()
               if id(m) not in shared and (_users_hooks(m._forward_hooks) or m._forward_pre_hooks
                                          or m._backward_hooks or m._backward_pre_hooks or "forward" in m.__dict__)]
    if dropped:
        logger.warning("fastbert.optimize: hooks (or a replaced forward) on %s are not carried over: "
                       "fastbert replaces transformers' container modules and shares only their leaf "
                       "modules (Linear, Embedding, LayerNorm, Dropout)", ", ".join(dropped))


def _users_hooks(hooks) -> list:
    """The forward hooks in ``hooks`` that are not transformers' own output-capturing hooks (which a
    call with ``output_hidden_states`` or ``output_attentions`` leaves on the layers, inactive outside
    such a call: fastbert returns those outputs itself)."""
    return [hook for hook in hooks.values()
            if getattr(hook, "__module__", None) != "transformers.utils.output_capturing"]


def _fresh_buffers(hf_model) -> nn.Module:
    device = hf_model.embeddings.word_embeddings.weight.device
    holder = nn.Module()
    positions = torch.arange(hf_model.config.max_position_embeddings, device=device).expand((1, -1))
    holder.position_ids, holder.token_type_ids = positions, torch.zeros_like(positions)
    return holder


def _is_transformers_bert(module) -> bool:
    return isinstance(module, transformers.BertModel) and not isinstance(module, BertModel)


def _not_swappable(module: transformers.BertModel) -> str | None:
    """Why fastbert cannot take the place of this transformers BertModel, or None."""
    if type(module).forward is not transformers.BertModel.forward:
        return f"{type(module).__name__} overrides BertModel.forward"
    model_type = getattr(module.config, "model_type", None)
    if model_type != "bert":
        return f"its config is of model_type {model_type!r}, not 'bert'"
    try:  # what fastbert.BertModel(config) would refuse (a decoder, another activation, ...), asked first
        check_config(module.config)  # so that no model is left half swapped
    except (NotImplementedError, ValueError) as error:
        return str(error)
    return _tree_difference(module)


def _tree_difference(module: transformers.BertModel) -> str | None:
    """Where this BertModel's module tree is not the one transformers builds from its config, as far
    as fastbert's copy of it would compute something else; None where it is.

    fastbert builds its own containers from the config and shares only transformers' leaf modules
    (Linear, Embedding, LayerNorm, Dropout, the pooler's activation), which it calls as modules where
    they are wrapped (PEFT) or hooked. Anything else changed by hand would be silently dropped: a
    container of another class (a subclass, a wrapper), a layer added or removed without the config
    saying so, another FFN activation module, a method replaced on an instance (``forward`` aside:
    the warning of ``_warn_of_dropped_hooks`` names those), or a transformers BERT class patched with a
    function from outside transformers."""
    config = copy.deepcopy(module.config)  # transformers' constructor may set attributes on its config
    config._attn_implementation = "eager"  # the tree is the same; others may check for their packages
    add_pooling_layer = module.pooler is not None
    try:
        with torch.device("meta"):
            expected = dict(transformers.BertModel(config, add_pooling_layer=add_pooling_layer).named_modules())
            ours = BertModel(config, add_pooling_layer=add_pooling_layer)
    except Exception as error:  # noqa: BLE001 - whatever it is, the swap cannot be shown safe
        return f"its module tree could not be checked against transformers' ({type(error).__name__}: {error})"
    shared = {name for name, m in ours.named_modules() if name and next(m.children(), None) is None}
    actual = dict(module.named_modules())
    layers = f"config.num_hidden_layers = {config.num_hidden_layers}"
    containers = set()
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            return f"it has no {name} ({layers})"
        if not name or name in shared:  # the root's class is checked below; shared leaves may be wrapped
            continue
        if type(got) is not type(want):
            return f"{name} is a {type(got).__qualname__}, not transformers' {type(want).__qualname__}"
        # What a container took from the config when it was built (a head count, a head size): fastbert's
        # containers take the config as it is now.
        built = {attr: value for attr, value in vars(want).items()
                 if isinstance(value, (int, float, str)) and not isinstance(value, bool)}
        stale = [attr for attr, value in built.items() if vars(got).get(attr, value) != value]
        if stale:
            return (f"{name}.{stale[0]} is {vars(got)[stale[0]]!r} where its config now makes it "
                    f"{built[stale[0]]!r} (the config was changed after the model was built)")
        replaced = [attr for attr, value in vars(got).items()
                    if attr != "forward" and callable(value) and inspect.isfunction(getattr(type(got), attr, None))]
        if replaced:
            return f"{name}.{replaced[0]} is replaced on the instance"
        containers.add(type(got))
    for name, got in actual.items():
        if name not in expected and not any(name.startswith(f"{leaf}.") for leaf in shared):
            return f"{name} ({type(got).__qualname__}) is not part of a BertModel of its config ({layers})"
    checks = [(type(module), ("forward",))] + [(cls, tuple(vars(cls))) for cls in containers]
    for cls, attrs in checks:  # each class once, not once per layer
        patched = _patched_method(cls, attrs)
        if patched:
            return patched
    return None


def _patched_method(cls: type, attrs: tuple[str, ...]) -> str | None:
    """The first of ``attrs`` that is a function of transformers' class ``cls`` from outside
    transformers: the class was patched at run time, and fastbert's copy would not run the patch."""
    if not cls.__module__.startswith("transformers."):
        return None  # torch's ModuleList, activations: their behaviour is theirs, not patched by users
    for attr in attrs:
        value = getattr(cls, attr, None)
        module_name = getattr(value, "__module__", None) or ""
        if inspect.isfunction(value) and not module_name.startswith("transformers."):
            return f"{cls.__name__}.{attr} is not transformers' own ({module_name}.{value.__qualname__})"
    return None


def optimize(model: nn.Module) -> nn.Module:
    """Swap fastbert's BertModel into ``model`` in place and return it.

    Takes a ``sentence_transformers.SentenceTransformer`` (the encoder sits at ``model[0].model``
    in sentence-transformers 6, where ``auto_model`` is a read-only property, and at
    ``model[0].auto_model`` before), a transformers ``BertFor*`` model (at ``.bert``), or anything
    else holding a transformers ``BertModel`` as a submodule. A bare transformers ``BertModel``
    cannot change class in place: the fastbert model sharing its weights is returned instead.
    """
    if _is_transformers_bert(model):
        reason = _not_swappable(model)
        if reason:
            raise ValueError(f"fastbert.optimize cannot take the place of this BertModel: {reason}")
        return to_fastbert(model)
    swapped, skipped = [], []
    replacements: dict[int, BertModel | None] = {}  # one encoder held in several places stays one (a bi-encoder)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if not _is_transformers_bert(child):
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            if id(child) not in replacements:
                reason = _not_swappable(child)
                if reason:
                    skipped.append(f"{path} ({reason})")
                replacements[id(child)] = None if reason else to_fastbert(child)
            if replacements[id(child)] is not None:
                parent._modules[name] = replacements[id(child)]
                swapped.append(path)
    if skipped:
        logger.warning("fastbert.optimize left these transformers BertModels in place: %s", "; ".join(skipped))
    if not swapped:
        if skipped:
            raise ValueError(f"fastbert.optimize cannot take the place of any BertModel in {type(model).__name__}: "
                             + "; ".join(skipped))
        if any(isinstance(m, BertModel) for m in model.modules()):
            return model  # already optimized
        others = sorted({f"{type(m).__name__} (model_type {getattr(m.config, 'model_type', None)!r})"
                         for m in model.modules() if isinstance(m, transformers.PreTrainedModel)})
        holds = f"; it holds {', '.join(others)}: fastbert runs BERT (model_type 'bert') only" if others else ""
        raise ValueError(f"fastbert.optimize found no transformers BertModel inside {type(model).__name__}{holds}")
    return model
