"""The task both sides share: model path, encoded data, target layers, method (cf. Flower's task.py).

``get_task(cfg)`` is cached per process, so a simulated client handling many rounds (or many nodes)
loads the tokenizer, the data and the base weights once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from fedsb import adapters
from fedsb.config import ConfigError, FedSBConfig
from fedsb.data import TaskData, load_task_data, make_loader
from fedsb.methods import Method, make_method
from fedsb.models import load_base_model, load_tokenizer, resolve_model_path
from fedsb.training import loss_fn_for

log = logging.getLogger(__name__)


@dataclass
class Task:
    cfg: FedSBConfig
    model_path: str
    data: TaskData
    layer_names: list[str]

    @property
    def loss_fn(self):
        return loss_fn_for(self.cfg.task)

    @property
    def tokenizer(self):
        return load_tokenizer(self.model_path)

    def base_model(self) -> nn.Module:
        return load_base_model(self.model_path, self.cfg.task, self.data.num_labels, self.cfg.seed)

    def method(self) -> Method:
        c = self.cfg
        return make_method(c.method, c.rank, c.scale, c.lora_alpha, c.seed)

    def loader(self, ds, shuffle: bool, seed: int = 0, batch_size: int | None = None):
        return make_loader(ds, batch_size or self.cfg.batch_size, self.data.pad_id, shuffle, seed)


def validate_targets(cfg: FedSBConfig, model: nn.Module) -> list[str]:
    """Target layers for this model; rank must fit every one of them (checked before any training)."""
    try:
        names = adapters.find_targets(model, cfg.targets)
    except adapters.TargetError as e:
        raise ConfigError("target-modules", str(e).removeprefix("run-config 'target-modules': ")) from e
    for n in names:
        m, k = adapters.linear_shape(model.get_submodule(n))
        if cfg.rank > min(m, k):
            raise ConfigError("rank", f"got {cfg.rank}, above min(out, in) = {min(m, k)} of layer {n} ({m}x{k}); lower rank")
    return names


@lru_cache(maxsize=2)
def get_task(cfg: FedSBConfig) -> Task:
    path = resolve_model_path(cfg.model, cfg.task)
    data = load_task_data(cfg, path)
    model = load_base_model(path, cfg.task, data.num_labels, cfg.seed)
    names = validate_targets(cfg, model)
    return Task(cfg, path, data, names)
