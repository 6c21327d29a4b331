"""Tasks: what is trained (sequence classification, causal LM); ``get_task`` picks one from the config."""

from __future__ import annotations

from fedsb.config import FedSBConfig
from fedsb.tasks.base import BUNDLED_PREFIX, Task
from fedsb.tasks.causal_lm import CausalLMTask
from fedsb.tasks.seq_cls import SeqClsTask

REGISTRY: dict[str, type[Task]] = {SeqClsTask.name: SeqClsTask, CausalLMTask.name: CausalLMTask}


def get_task(cfg: FedSBConfig) -> Task:
    """The registered task that ``cfg.task`` names, loaded (once per process) for this config."""
    return REGISTRY[cfg.task].load(cfg)


def base_model_path(name: str) -> str:
    """The local folder an export's ``base_model_name_or_path`` names: ``fedsb:default/<task>`` is that task's
    bundled model on this machine; anything else is returned as is (a folder, or a hub name)."""
    if name.startswith(BUNDLED_PREFIX):
        return REGISTRY[name.removeprefix(BUNDLED_PREFIX)].default_model()
    return name


__all__ = ["Task", "REGISTRY", "get_task", "base_model_path", "SeqClsTask", "CausalLMTask"]
