"""One typed, validated configuration object for a fedsb run.

Flower hands every app a flat ``run_config`` mapping with kebab-case keys (``[tool.flwr.app.config]``
in ``pyproject.toml``, overridden by ``--run-config``). ``FedSBConfig.from_run_config`` turns it into
this frozen dataclass once, at the edge; nothing deeper in the code reads the raw mapping.

Each field's metadata carries a help line (the README's key table is rendered from it: ``python -m
fedsb.config --write-readme README.md``), where it applies the accepted choices or a numeric range, and
whether it is part of a run's *identity*: a key that must not change when a run resumes from its
checkpoint. Identity is the default, so a new key cannot be forgotten; only the operational keys that a
resumed run may change say ``identity=False``, and a key that is identity only in some runs says when
(``identity_when``: e.g. the number of rounds, which DP's calibrated noise and the linear lr schedule are
planned over). A bad value raises ``ConfigError`` naming the kebab-case key, what was given and what is
accepted.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fedsb.aggregation.robust import TRIM_FRACTION_MAX, check_aggregation_keys
from fedsb.config_data import check_data_keys
from fedsb.config_text import ConfigError, coerce, markdown_table, readme_with_table, suggest
from fedsb.upload import UPLOAD_DTYPES
from fedsb.wire import BASIS_DTYPES

METHODS = ("fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora")
TASKS = ("seq-cls", "causal-lm")


def _f(default, help: str, *, choices=None, lo=None, hi=None, lo_open=False, hi_open=False, identity=True,
       identity_when: tuple[str, Callable[["FedSBConfig"], bool]] | None = None):
    """A config field; ``identity_when=(text, predicate)``: not identity, except in a run where the
    predicate holds (``text`` says when, in the README's key table)."""
    return field(
        default=default,
        metadata={"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
                  "identity": identity and identity_when is None, "identity_when": identity_when},
    )


@dataclass(frozen=True)
class FedSBConfig:
    # --- task, model, data -------------------------------------------------------------------
    task: str = _f("seq-cls", "what is trained: sequence classification or a causal LM", choices=TASKS)
    model: str = _f("default", "a local Hugging Face model folder, or `default` (bundled MiniLM / SmolLM2)")
    dataset: str = _f(
        "default",
        "a CSV/JSONL file, or `default` (bundled tweet sentiment; for causal-lm reasoning-gym digit_sum, or "
        "`reasoning:NAME`, `gsm`, `chatterbot`), or `none`: the server holds no training data (seq-cls; each node "
        "trains on its own --node-config dataset, labels required)",
    )
    eval_dataset: str = _f("", "with dataset='none': the server's own evaluation file (same columns as dataset); "
                           "empty: federated evaluation, on each node's held-out slice")
    text_column: str = _f("text", "column holding the input text")
    text_pair_column: str = _f("", "optional second text column (sentence pairs, e.g. NLI); empty for none")
    label_column: str = _f("sentiment", "column holding the class label (any strings or integers)")
    labels: str = _f("", "the classes, comma-separated, in the head's order (e.g. `negative,neutral,positive`): "
                     "every party maps them alike, and a file with another label is refused; empty: the distinct "
                     "values of label-column in dataset, sorted")
    max_length: int = _f(64, "tokens per example after truncation", lo=1, hi=8192)
    test_fraction: float = _f(0.1, "fraction of the data held out (seeded) for server-side evaluation", lo=0.0, hi=0.9, lo_open=True)
    validation_fraction: float = _f(0.0, "fraction of the training data set aside (seeded, after the held-out split, "
                                    "before partitioning) for choosing hyperparameters; no client trains on it",
                                    lo=0.0, hi=0.5, hi_open=True)
    eval_split: str = _f("test", "what the server evaluates: the held-out `test` set, or the `validation` slice "
                         "(needs validation-fraction > 0; `fedsb compare` picks learning rates on it)",
                         choices=("test", "validation"))
    eval_max_samples: int = _f(1000, "cap on held-out examples evaluated by the server (0: all)", lo=0)
    partitioner: str = _f("iid", "how training data is split over clients", choices=("iid", "dirichlet"))
    dirichlet_alpha: float = _f(0.5, "Dirichlet concentration over labels (smaller: more skewed)", lo=0.0, lo_open=True)
    # --- method ------------------------------------------------------------------------------
    method: str = _f("fed-sb", "federated fine-tuning method", choices=METHODS)
    rank: int = _f(32, "adapter rank r (Fed-SB trains an r x r matrix per layer)", lo=1)
    client_ranks: str = _f("", "Fed-SB nested ranks: comma-separated k <= rank assigned round-robin by partition id (a "
                           "client trains the leading k x k block of R); a node's --node-config rank=k overrides; "
                           "empty: every client at rank")
    scale: float = _f(1.0, "Fed-SB scale s in W0 + s*B*R*A", lo=0.0, lo_open=True)
    lora_alpha: float = _f(16.0, "LoRA alpha of the baseline methods (their scale is alpha/r)", lo=0.0, lo_open=True)
    train_pooler: bool = _f(False, "seq-cls: also train the [CLS] pooler (dense + tanh) with the head, for every method "
                            "alike (sent every round and exported in PEFT's modules_to_save)")
    target_modules: str = _f("auto", "comma-separated module names to adapt, or `auto` for the architecture's default")
    init_samples: int = _f(64, "examples per client whose gradients build the Fed-SB initialization", lo=1)
    init_update: str = _f("sign", "update approximation: first Adam step (`sign`) or plain gradient (`grad`)", choices=("sign", "grad"))
    init_lr: float = _f(1e-3, "step size eta of the approximated full fine-tuning step", lo=0.0, lo_open=True)
    init_svd: str = _f("auto", "truncated SVD: `exact`, `randomized` or `auto` (randomized for large layers)", choices=("auto", "exact", "randomized"))
    init_fraction: float = _f(0.5, "fraction of nodes asked for Fed-SB initialization gradients (sampled with the seed; other methods ignore it)", lo=0.0, hi=1.0, lo_open=True)
    init_basis: str = _f("gradient", "Fed-SB basis: `gradient` (from init gradients), `random` (seeded orthonormal B, A), "
                         "`weights`/`weights-minor` (top/bottom singular vectors of each node's own W0, no download); R0 = 0 "
                         "but for `gradient`", choices=("gradient", "random", "weights", "weights-minor"))
    init_upload: str = _f("sign", "what a client uploads for the init: `sign` (its gradient's signs, 1 bit each; the "
                          "server takes the example-weighted majority vote) or `dense` (float32 gradient sums)",
                          choices=("sign", "dense"))
    init_source: str = _f("clients", "whose data the init gradient comes from: `clients`, or `server` (the server's "
                          "own data, init-dataset: no client uploads anything for it and DP spends nothing on it)",
                          choices=("clients", "server"))
    init_dataset: str = _f("", "the server's data for init-source=server (same format and columns as dataset); "
                           "empty: a slice of dataset carved out before the split and never given to a client")
    init_server_samples: int = _f(640, "examples the server's init gradient sums over (init-source=server)", lo=1)
    basis_dtype: str = _f("int4", "dtype of the one-time B, A broadcast (int8, int4: a scale per basis vector, "
                          "int4 packed two per byte; what every party uses and fingerprints is the dequantized basis)", choices=BASIS_DTYPES)
    upload_dtype: str = _f("float32", "a client's round upload, any method: `float32` (its vector) or its update as `int8`/"
                           "`int4` codes (unbiased stochastic rounding, a scale per tensor; not with secagg)", choices=UPLOAD_DTYPES)
    download_dtype: str = _f("float32", "the server's round broadcast, any method: `float32`, or `int8`/`int4` codes "
                             "(seeded rounding, a scale a tensor; clients start from them; not with secagg)", choices=UPLOAD_DTYPES)

    # --- hardware ----------------------------------------------------------------------------
    device: str = _f("auto", "where clients train and the server evaluates and initializes: `auto` (CUDA when "
                     "available), `cpu` or `cuda`; what goes on the wire is CPU float32 either way",
                     choices=("auto", "cpu", "cuda"), identity=False)
    base_dtype: str = _f("float32", "dtype of the frozen base weights; R, the head, optimizer state and aggregation stay "
                         "float32", choices=("float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, more time)",
                                      identity=False)
    # --- rounds ------------------------------------------------------------------------------
    num_server_rounds: int = _f(10, "federated rounds after the initialization", lo=1,
                                # σ is calibrated to target-epsilon over all rounds, the linear schedule spans them
                                identity_when=("dp=true or lr-schedule=linear", lambda c: c.dp or c.lr_schedule == "linear"))
    fraction_train: float = _f(0.4, "fraction of nodes sampled for training each round", lo=0.0, hi=1.0, lo_open=True)
    min_train_nodes: int = _f(2, "fewest nodes a round samples, and fewest valid replies it needs to update", lo=1)
    min_available_nodes: int = _f(2, "nodes the server waits for before starting", lo=1, identity=False)
    round_timeout: float = _f(600.0, "seconds the server waits for a round's replies", lo=0.0, lo_open=True, identity=False)
    local_steps: int = _f(10, "optimizer steps per client per round", lo=1)
    batch_size: int = _f(16, "local batch size", lo=1)
    learning_rate: float = _f(5e-3, "AdamW learning rate of the local steps", lo=0.0, lo_open=True)
    lr_schedule: str = _f("constant", "learning rate over all rounds' local steps: `constant`, or `linear` (linear "
                          "warm-up over warmup-ratio of them, then linear decay to 0, as transformers' "
                          "get_linear_schedule_with_warmup)", choices=("constant", "linear"))
    warmup_ratio: float = _f(0.0, "fraction of all rounds' local steps spent warming up (lr-schedule=linear)",
                             lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = _f(0.0, "AdamW weight decay", lo=0.0)
    aggregation: str = _f("mean", "how R (and head) updates are combined", choices=("mean", "median", "trimmed-mean", "krum"))
    trim_fraction: float = _f(0.1, "fraction trimmed at each end by `trimmed-mean`", lo=0.0, hi=TRIM_FRACTION_MAX, hi_open=True)
    malicious_nodes: int = _f(0, "attackers' replies Krum tolerates in a round (its f); aggregation='krum' only", lo=0)
    krum_select: int = _f(1, "lowest-scored replies averaged (1: Krum, more: Multi-Krum); aggregation='krum' only", lo=1)
    max_update_norm: float = _f(0.0, "reject a reply whose update norm exceeds this (0: no bound)", lo=0.0)
    max_num_examples: int = _f(0, "reject a reply claiming more examples than this as its weight (0: no bound)", lo=0)
    eval_every: int = _f(1, "centralized evaluation every this many rounds (the last round always)", lo=1, identity=False)
    federated_evaluate: bool = _f(False, "also ask nodes (those that did not train the round, where there are enough) to "
                                  "evaluate on their local data", identity=False)
    seed: int = _f(42, "seed of data split, partition, sampling and initialization", lo=0)
    output_dir: str = _f("", "the run directory (created if missing); empty: runs/<method>-<time>", identity=False)
    resume: bool = _f(False, "continue from the checkpoint in output-dir", identity=False)
    # --- privacy -----------------------------------------------------------------------------
    dp: bool = _f(False, "Opacus DP-SGD on the clients (and a private initialization gradient)")
    target_epsilon: float = _f(8.0, "privacy budget over the whole run (init + all rounds)", lo=0.0, lo_open=True)
    target_delta: float = _f(0.0, "delta; 0: 1/(10 n) for the smallest client's n", lo=0.0, hi=1.0)
    max_grad_norm: float = _f(1.0, "per-sample gradient clipping norm C", lo=0.0, lo_open=True)
    noise_multiplier: float = _f(0.0, "sigma; 0: calibrated to target-epsilon over the horizon", lo=0.0)
    accountant: str = _f("prv", "Opacus privacy accountant", choices=("prv", "rdp"))
    grad_sample_mode: str = _f("hooks", "Opacus per-sample gradient mode", choices=("hooks", "functorch"))
    # --- secure aggregation ------------------------------------------------------------------
    secagg: bool = _f(False, "SecAgg+ secure aggregation of R and head")
    secagg_shares: int = _f(3, "SecAgg+ shares per client", lo=2)
    secagg_threshold: int = _f(2, "SecAgg+ reconstruction threshold", lo=1)
    secagg_clip_range: float = _f(8.0, "SecAgg+ quantization range [-c, c] of the pre-scaled values", lo=0.0, lo_open=True)
    secagg_quantization_range: int = _f(4194304, "SecAgg+ quantization levels", lo=2)
    # --- causal LM ---------------------------------------------------------------------------
    eval_generate_samples: int = _f(32, "held-out problems generated for exact match (causal-lm)", lo=0, identity=False)
    max_new_tokens: int = _f(0, "generation length for exact match (causal-lm; 0: the dataset's own, e.g. 6 for "
                             "digit_sum, 96 for gsm)", lo=0, identity=False)
    num_examples: int = _f(0, "examples drawn from a generator dataset (causal-lm `default`, `reasoning:NAME`, `gsm`); "
                           "0: the dataset's own (all 200 distinct digit_sum problems; 2000 otherwise)", lo=0)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def key_of(name: str) -> str:
        return name.replace("_", "-")

    @classmethod
    def keys(cls) -> list[str]:
        return [cls.key_of(f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedSBConfig":
        """Build from Flower's flat run config; unknown keys and bad values raise ConfigError."""
        by_key = {cls.key_of(f.name): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in by_key:
                raise ConfigError(key, f"unknown key.{suggest(key, by_key)} Known keys: {', '.join(sorted(by_key))}")
            f = by_key[key]
            values[f.name] = coerce(key, raw, type(f.default))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        return {self.key_of(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "FedSBConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            key, v, m = self.key_of(f.name), getattr(self, f.name), f.metadata
            if m.get("choices") and v not in m["choices"]:
                raise ConfigError(key, f"got {v!r}; accepted values: {', '.join(m['choices'])}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(key, f"got {v!r}; must be a finite number")
            lo, hi = m.get("lo"), m.get("hi")
            if lo is not None and (v < lo or (m.get("lo_open") and v == lo)):
                op = ">" if m.get("lo_open") else ">="
                raise ConfigError(key, f"got {v!r}; must be {op} {lo}")
            if hi is not None and (v > hi or (m.get("hi_open") and v == hi)):
                op = "<" if m.get("hi_open") else "<="
                raise ConfigError(key, f"got {v!r}; must be {op} {hi}")
        # Combinations.
        if self.train_pooler and self.task != "seq-cls":
            raise ConfigError("train-pooler", f"applies to task='seq-cls' (got {self.task!r}); set it to false")
        check_data_keys(self)
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError("min-available-nodes", f"got {self.min_available_nodes}, below min-train-nodes="
                              f"{self.min_train_nodes}; raise it or lower min-train-nodes")
        if self.secagg and self.secagg_threshold > self.secagg_shares:
            raise ConfigError("secagg-threshold", f"got {self.secagg_threshold} > secagg-shares={self.secagg_shares}; "
                              "it must not exceed the shares")
        from fedsb.methods import REGISTRY  # here, not at the top: the config module loads without torch

        method = REGISTRY[self.method]
        if self.secagg and not method.supports_secagg:
            able = ", ".join(n for n, c in REGISTRY.items() if c.supports_secagg)
            raise ConfigError("secagg", f"cannot be combined with method={self.method!r}: it needs each client's own "
                              f"A_i and B_i, which secure aggregation hides; use {able}")
        check_aggregation_keys(self)
        for key, value in (("upload-dtype", self.upload_dtype), ("download-dtype", self.download_dtype)):
            if self.secagg and value != "float32":  # SecAgg+ quantizes its own way; its FitIns carry float32
                raise ConfigError(key, f"got {value!r} with secagg=true; set {key}='float32'")
        if self.dp and self.federated_evaluate:
            # Local evaluation reads the clients' private data outside DP-SGD, so its loss and accuracy
            # would be released without any guarantee (there is no silent non-private path).
            raise ConfigError("federated-evaluate", "cannot be combined with dp=true: clients would report "
                              "loss/accuracy on their private data outside the DP guarantee; set it to false "
                              "(the server's held-out evaluation still runs)")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device", "got 'cuda' but torch sees no CUDA device here (torch "
                                  f"{torch.__version__}, CUDA build: {torch.version.cuda}); use device='auto' or 'cpu', "
                                  "or install a CUDA build of torch on a machine with a GPU")
        if self.client_ranks.strip():
            ranks = self.client_rank_list
            if not method.supports_nested_ranks:
                able = ", ".join(n for n, c in REGISTRY.items() if c.supports_nested_ranks)
                raise ConfigError("client-ranks", f"nested ranks need a method whose nodes can train a leading block of "
                                  f"one shared basis, as Fed-SB's do ({able}; got method={self.method!r}); leave it empty")
            if self.secagg or self.aggregation != "mean":
                raise ConfigError("client-ranks", "clients of different ranks send vectors of different lengths: "
                                  "only aggregation='mean' without secagg combines them; leave it empty")
            if any(k < 1 or k > self.rank for k in ranks):
                raise ConfigError("client-ranks", f"got {ranks}; every k must be in [1, rank={self.rank}]")
        if self.init_upload == "sign" and self.init_update != "sign":
            raise ConfigError("init-upload", "`sign` uploads only the gradient's signs, which init-update=grad "
                              "cannot use; set init-upload='dense' with init-update='grad'")
        if self.init_source == "server" and self.init_basis != "gradient":
            raise ConfigError("init-source", f"a {self.init_basis} basis uses no init gradient; leave init-source='clients'")
        if not method.needs_basis and self.init_basis != "gradient":
            able = ", ".join(n for n, c in REGISTRY.items() if c.needs_basis)
            raise ConfigError("init-basis", f"only applies to method={able} (got method={self.method!r}); leave it at 'gradient'")

    @property
    def label_list(self) -> tuple[str, ...]:
        """``labels`` as a tuple (empty: the classes come from the data)."""
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())

    @property
    def client_rank_list(self) -> list[int]:
        try:
            return [int(k) for k in self.client_ranks.split(",") if k.strip()]
        except ValueError:
            raise ConfigError("client-ranks", f"got {self.client_ranks!r}; give comma-separated integers, "
                              "e.g. '8,16,32'") from None

    def rank_of_partition(self, partition_id: int, node_rank: Any = None) -> int:
        """The rank a client trains: its node's ``rank`` if set, else client-ranks round-robin, else rank."""
        if node_rank not in (None, ""):
            return int(node_rank)
        ranks = self.client_rank_list
        return ranks[partition_id % len(ranks)] if ranks else self.rank

    @property
    def torch_device(self) -> str:
        """``device`` resolved on this machine (validated: ``cuda`` is refused where there is none)."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def torch_base_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.base_dtype]

    @classmethod
    def identity_keys(cls) -> list[str]:
        """Keys that must not change when any run resumes (every key unless marked ``identity=False`` or
        ``identity_when``)."""
        return [cls.key_of(f.name) for f in dataclasses.fields(cls) if f.metadata.get("identity", True)]

    def identity(self) -> dict[str, Any]:
        """This run's identity: the identity keys, and the ``identity_when`` keys whose condition holds here."""
        when = {self.key_of(f.name) for f in dataclasses.fields(self)
                if f.metadata.get("identity_when") and f.metadata["identity_when"][1](self)}
        keys = set(self.identity_keys()) | when
        return {k: v for k, v in self.to_run_config().items() if k in keys}

    @property
    def targets(self) -> list[str] | None:
        """Explicit target module names, or None for the architecture's default."""
        if self.target_modules.strip() in ("", "auto"):
            return None
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


if __name__ == "__main__":  # python -m fedsb.config [--write-readme README.md]
    if len(sys.argv) == 3 and sys.argv[1] == "--write-readme":
        Path(sys.argv[2]).write_text(readme_with_table(FedSBConfig, Path(sys.argv[2]).read_text()))
    else:
        sys.stdout.write(markdown_table(FedSBConfig))
