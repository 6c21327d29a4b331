"""The pre-flight check: every config error a run can know of before Flower starts, found cheaply.

``fedsb simulate`` and ``fedsb check-config`` (which ``make run`` calls before ``flwr run``) call it. It
reads the config, checks that files exist, reads only a dataset's header and a model's ``config.json``
(the model is built on the meta device: module names and shapes, no weights), and checks the run
directory, without creating anything: a run that fails here leaves nothing behind. (Under a bare
``flwr run`` the ServerApp finds the same errors when it loads its task, before it creates the run
directory.)
"""

from __future__ import annotations

from pathlib import Path

from fedsb.config import ConfigError, FedSBConfig


def check_num_nodes(cfg: FedSBConfig, num_nodes: int) -> None:
    """A simulation of ``num_nodes`` nodes can start this run (the server waits for min-available-nodes)."""
    if num_nodes < 1:
        raise ConfigError("num-supernodes", f"got {num_nodes}; a simulation needs at least 1 node")
    if num_nodes < cfg.min_available_nodes:
        raise ConfigError("min-available-nodes", f"got {cfg.min_available_nodes}, but the simulation has only "
                          f"{num_nodes} node(s) (--num-supernodes {num_nodes}); the server would wait for nodes that "
                          f"never come. Raise the number of nodes or lower min-available-nodes (and min-train-nodes)")


def check_data(cfg: FedSBConfig) -> None:
    """The server's data files exist and name the configured columns (header / first record only)."""
    from fedsb.tasks.data import check_columns, table_columns, table_path

    if cfg.task == "causal-lm":  # generators need no file; a JSONL file is read in full later
        if cfg.dataset.endswith((".jsonl", ".json")) and not Path(cfg.dataset).expanduser().is_file():
            raise ConfigError("dataset", f"{cfg.dataset!r} is not a file; give a JSONL path with prompt/answer "
                              "records, `default`, `reasoning:NAME`, `gsm` or `chatterbot`")
        return
    for key, dataset in (("dataset", cfg.dataset), ("init-dataset", cfg.init_dataset), ("eval-dataset", cfg.eval_dataset)):
        if dataset and not (key == "dataset" and dataset == "none"):  # none: the server holds no training data
            path = table_path(dataset, key)
            check_columns(path, table_columns(path), cfg.text_column, cfg.label_column, cfg.text_pair_column)


def check_model(cfg: FedSBConfig) -> None:
    """The model folder holds a config transformers reads, and target-modules and rank fit its layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedsb.tasks import REGISTRY
    from fedsb.tasks.base import validate_targets
    from fedsb.tasks.models import pooler_name, resolve_model_path

    path = resolve_model_path(cfg.model, REGISTRY[cfg.task].default_model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"{cfg.model!r}: transformers cannot read its config.json ({e})") from e
    auto = AutoModelForCausalLM if cfg.task == "causal-lm" else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):  # module names and shapes only: no weights are read or allocated
            model = auto.from_config(config)
    except ValueError as e:
        raise ConfigError("model", f"{cfg.model!r} has no {auto.__name__} for task={cfg.task!r} ({e})") from e
    if cfg.train_pooler:
        model.fedsb_extra_heads = [pooler_name(model)]
    validate_targets(cfg, model)


def preflight(cfg: FedSBConfig, num_nodes: int | None = None, model_and_data: bool = True) -> None:
    """Raise ConfigError (naming the key) for any error found before a run starts; create nothing.
    ``model_and_data=False``: an app with its own Task, whose model and data fedsb cannot check."""
    from fedsb.run.records import check_run_dir

    if num_nodes is not None:
        check_num_nodes(cfg, num_nodes)
    check_run_dir(cfg)
    if model_and_data:
        check_data(cfg)
        check_model(cfg)
