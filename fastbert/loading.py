"""Checks around transformers' ``from_pretrained``: it only warns where fastbert refuses."""

from __future__ import annotations

import json

from transformers import PretrainedConfig
from transformers.utils.peft_utils import find_adapter_config_file

# Top-level modules of fastbert.BertModel: an unexpected checkpoint key under one of these is a
# weight the model would silently drop. Keys of task heads (``cls.*``, ``classifier.*``) are not
# the encoder's and are skipped, as transformers skips them.
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
_CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def check_model_type(path, kwargs: dict) -> None:
    """Refuse a checkpoint of another model type, naming it; a config without ``model_type`` loads as
    BERT, as ``transformers.BertModel.from_pretrained`` loads it. A PEFT adapter's folder (no
    config.json, an ``adapter_config.json``) is checked by its base model, which transformers loads
    before the adapter."""
    hub_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, **hub_kwargs)
    except OSError as error:
        config_dict, failure = None, error
    else:
        failure = None
    if not config_dict:
        base = _adapter_base_model(path, hub_kwargs)
        if base:
            return check_model_type(base, {k: v for k, v in kwargs.items() if k != "subfolder"})
        if failure is not None:
            raise failure  # transformers' own message (no such folder or hub id, no network, bad JSON, ...)
        where = f"{path} (subfolder {kwargs['subfolder']!r})" if kwargs.get("subfolder") else str(path)
        raise OSError(f"{where} has no config.json (a BERT checkpoint directory holds config.json and its weights)")
    model_type = config_dict.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"{path} holds a {model_type!r} model; fastbert.BertModel loads BERT checkpoints "
                         "(model_type 'bert') only")


def _adapter_base_model(path, hub_kwargs: dict) -> str | None:
    """``base_model_name_or_path`` of the PEFT adapter at ``path``, or None where there is none."""
    try:
        adapter = find_adapter_config_file(str(path), **hub_kwargs)
    except OSError:
        return None
    if adapter is None:
        return None
    with open(adapter) as f:
        return json.load(f).get("base_model_name_or_path")


def check_loading_info(model, info: dict, path) -> None:
    """Raise, naming the keys, when the checkpoint lacks weights of the model or holds encoder
    weights the model does not have. ``strict=False`` restores transformers' warnings."""
    missing = sorted(info.get("missing_keys", ()))
    prefixes = _ENCODER_PREFIXES if model.pooler is not None else _ENCODER_PREFIXES[:2]
    # A head's checkpoint (BertForSequenceClassification, ...) names the encoder's weights "bert.*".
    head_prefix = f"{model.base_model_prefix}."
    # Buffers the model does not save (embeddings.position_ids, .token_type_ids), which some checkpoints
    # hold anyway: no weight of the checkpoint is left out by skipping them, as transformers does.
    unsaved = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    unexpected = sorted(k for k in info.get("unexpected_keys", ())
                        if (key := k.removeprefix(head_prefix)).startswith(prefixes) and key not in unsaved)
    mismatched = sorted(_mismatch(k) for k in info.get("mismatched_keys", ()))
    problems = []
    if missing:
        hint = (" (a checkpoint without a pooler loads with add_pooling_layer=False)"
                if all(k.startswith("pooler.") for k in missing) else "")
        problems.append(f"missing from the checkpoint: {', '.join(missing)}{hint}")
    if unexpected:
        problems.append(f"not weights of fastbert.BertModel: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"of another shape than the model's: {', '.join(mismatched)}")
    if problems:
        raise ValueError(f"{path}: checkpoint keys do not match the model: " + "; ".join(problems)
                         + ". Pass strict=False to load anyway (transformers' behaviour).")


def _mismatch(entry) -> str:
    """transformers' ``(key, checkpoint shape, model shape)`` entry, in words."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, checkpoint, model = entry
        return f"{key} (checkpoint {tuple(checkpoint)}, model {tuple(model)})"
    return str(entry)
