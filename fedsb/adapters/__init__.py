"""Adapters: the LoRA-SB and LoRA layers, where they go in a model, and LoRA-SB's initialization."""

from fedsb.adapters.inject import (DEFAULT_TARGETS, HEAD_NAMES, TargetError, adapter_layers, count_trainable,
                                   default_targets, find_targets, freeze_for_adapters, head_prefixes, inject,
                                   inject_lora, inject_sb, merge_all, trainable_state, unmerge_all, unwrap)
from fedsb.adapters.layers import Conv1D, LoRALinear, SBLinear, is_linear, linear_shape, weight_as_mn

__all__ = ["DEFAULT_TARGETS", "HEAD_NAMES", "TargetError", "adapter_layers", "count_trainable", "default_targets",
           "find_targets", "freeze_for_adapters", "head_prefixes", "inject", "inject_lora", "inject_sb", "merge_all",
           "trainable_state", "unmerge_all", "unwrap", "Conv1D", "LoRALinear", "SBLinear", "is_linear", "linear_shape",
           "weight_as_mn"]
