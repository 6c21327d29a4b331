"""Tasks: what is trained (sequence classification, causal LM); ``get_task`` picks one from the config."""

from __future__ import annotations

from fedsb.config import FedSBConfig
from fedsb.tasks.base import Task
from fedsb.tasks.causal_lm import CausalLMTask
from fedsb.tasks.seq_cls import SeqClsTask

REGISTRY: dict[str, type[Task]] = {SeqClsTask.name: SeqClsTask, CausalLMTask.name: CausalLMTask}


def get_task(cfg: FedSBConfig) -> Task:
    """The registered task that ``cfg.task`` names, loaded (once per process) for this config."""
    return REGISTRY[cfg.task].load(cfg)


__all__ = ["Task", "REGISTRY", "get_task", "SeqClsTask", "CausalLMTask"]
