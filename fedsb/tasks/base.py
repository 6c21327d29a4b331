"""The ``Task`` plug-in both apps share: model, encoded data, loss, evaluation, PEFT task type (cf. Flower's task.py).

A task (sequence classification, causal LM) is one subclass in this folder, registered in
``fedsb/tasks/__init__.py`` and chosen once from the config by ``get_task``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import nn

from fedsb import adapters
from fedsb.config import ConfigError, FedSBConfig
from fedsb.tasks.data import TaskData, make_loader, pad_collate
from fedsb.tasks.models import load_base_model, load_tokenizer, model_content_id, resolve_model_path


BUNDLED_PREFIX = "fedsb:default/"  # an export's base model name for a task's bundled default model


@dataclass
class Task:
    cfg: FedSBConfig
    model_path: str
    data: TaskData
    layer_names: list[str]
    # the model's content (architecture and target-layer weights), what the basis fingerprint names it by
    model_id: str = ""

    name: ClassVar[str]
    peft_task_type: ClassVar[str]  # what the exported PEFT adapter declares

    # -- what a subclass provides ---------------------------------------------------------------
    @classmethod
    def default_model(cls) -> str:
        """Path of the bundled model that ``model = "default"`` means."""
        raise NotImplementedError

    @classmethod
    def load_data(cls, cfg: FedSBConfig, model_path: str) -> TaskData:
        raise NotImplementedError

    @staticmethod
    def per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        """One loss per example (no reduction): sums of it give sums of per-example gradients."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        """Mean loss and the task's metric over the loader (``num-examples`` included)."""
        raise NotImplementedError

    def server_evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        """What the server reports on its held-out split each round (may add costly metrics)."""
        return self.evaluate(model, loader)

    def summary(self) -> dict[str, Any]:
        """Task-specific entries of ``summary.json``."""
        return {}

    def server_dataset(self):
        """The server's own examples for init-source=server: the slice carved out before the split."""
        return self.data.server_dataset()

    # -- shared ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: FedSBConfig) -> "Task":
        """This task for ``cfg``: model path, encoded data and target layers (validated), loaded once per
        process, so a simulated client handling many rounds (or many nodes) pays for it once."""
        return _load_task(cls, cfg)

    @property
    def loss_fn(self):
        return self.per_example_loss

    @property
    def tokenizer(self):
        return load_tokenizer(self.model_path)

    def base_model(self) -> nn.Module:
        """A fresh copy of the frozen base model, its weights in base-dtype, on the configured device."""
        model = self.frozen_copy()
        if self.data.label_names:  # the exported head's config then names its classes (transformers reads them)
            model.config.id2label = dict(enumerate(self.data.label_names))
            model.config.label2id = {name: i for i, name in enumerate(self.data.label_names)}
        if self.cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            # non-reentrant: the frozen base's inputs need no grad for R's gradient to flow through
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.to(self.device)

    def frozen_copy(self) -> nn.Module:
        """A fresh copy of the frozen base as loaded (``base_model`` adds labels, checkpointing, device)."""
        return load_base_model(self.model_path, self.name, self.data.num_labels, self.cfg.seed, self.cfg.torch_base_dtype,
                               self.cfg.train_pooler)

    @property
    def portable_model_name(self) -> str:
        """What an export records as its base model: ``fedsb:default/<task>`` for a registered task's bundled
        model (it sits in site-packages or a cache, at another path on every machine; ``fedsb.tasks.base_model_path``
        finds it), else the model folder's absolute path (a relative one would depend on the server's cwd)."""
        from fedsb.tasks import REGISTRY

        return f"{BUNDLED_PREFIX}{self.name}" if self.cfg.model == "default" and REGISTRY.get(self.name) is type(self) \
            else self.model_path

    @property
    def device(self) -> str:
        return self.cfg.torch_device

    def collate(self):
        return pad_collate(self.data.pad_id, self.device)

    def loader(self, ds, shuffle: bool, seed: int = 0, batch_size: int | None = None):
        return make_loader(ds, batch_size or self.cfg.batch_size, self.data.pad_id, shuffle, seed, self.device)


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
def _load_task(cls: type[Task], cfg: FedSBConfig) -> Task:
    path = resolve_model_path(cfg.model, cls.default_model)
    data = cls.load_data(cfg, path)
    model = load_base_model(path, cls.name, data.num_labels, cfg.seed, cfg.torch_base_dtype, cfg.train_pooler)
    names = validate_targets(cfg, model)
    return cls(cfg, path, data, names, model_content_id(path, model, names))
