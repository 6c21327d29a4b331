"""The run config's rules about whose data is where: the label set, the validation slice, the server's own
files (init-dataset, eval-dataset) and a server that holds no training data at all (``dataset='none'``)."""

from __future__ import annotations

from fedsb.config_text import ConfigError


def check_data_keys(cfg) -> None:
    """Raise ConfigError for a combination of the data keys of ``cfg`` (a ``FedSBConfig``) that cannot run."""
    if cfg.eval_split == "validation" and cfg.validation_fraction == 0:
        raise ConfigError("eval-split", "`validation` needs a validation slice; set validation-fraction > 0 "
                          "(e.g. 0.1) or eval-split='test'")
    if cfg.labels.strip() and (len(cfg.label_list) < 2 or len(set(cfg.label_list)) != len(cfg.label_list)):
        raise ConfigError("labels", f"got {cfg.labels!r}; give at least two distinct comma-separated classes, "
                          "e.g. 'negative,neutral,positive'")
    if cfg.init_dataset and cfg.init_source != "server":
        raise ConfigError("init-dataset", f"is read only with init-source='server' (got {cfg.init_source!r}); "
                          "set init-source='server' or leave init-dataset empty")
    if cfg.dataset != "none":
        if cfg.eval_dataset:
            raise ConfigError("eval-dataset", f"is read only with dataset='none' (got dataset={cfg.dataset!r}, whose "
                              "held-out split the server evaluates on); leave eval-dataset empty")
        return
    # dataset='none': the server reads no training data; every node trains on its own --node-config dataset
    if cfg.task != "seq-cls":
        raise ConfigError("dataset", f"`none` applies to task='seq-cls' (got task={cfg.task!r}); name a dataset")
    if not cfg.label_list:
        raise ConfigError("labels", "dataset='none' needs labels (e.g. labels='negative,neutral,positive'): with no "
                          "data on the server, the head's size and class order come from labels alone")
    if cfg.validation_fraction > 0:
        raise ConfigError("validation-fraction", "is a slice of the server's training data, and dataset='none' "
                          "gives the server none; set validation-fraction=0")
    if cfg.init_source == "server" and not cfg.init_dataset:
        raise ConfigError("init-source", "`server` with dataset='none' needs the server's own init data: set "
                          "init-dataset=PATH, or init-source='clients' (the nodes' own data)")
    if cfg.dp and not cfg.eval_dataset:
        raise ConfigError("eval-dataset", "dp=true with dataset='none' needs the server's own evaluation file: "
                          "without one, evaluation is federated, and nodes would report loss/accuracy on their "
                          "private data outside the DP guarantee; set eval-dataset=PATH")
