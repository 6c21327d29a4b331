"""``fedsb compare``: methods side by side on identical partitions, over a grid of ranks and seeds, each
(method, rank) at its own learning rate, chosen on a validation split and never on the held-out set.

For every method and rank: if ``--lr`` gives that method several rates, each runs once (first seed) with
the server evaluating on the validation slice (``eval-split=validation``); the best one is kept, and when
it sits at an edge of the grid the grid is extended by a factor 2 on that side (``--max-extend`` times),
because the best rate moves with the rank. Then the chosen rate runs on ``--seeds`` seeds (seed, seed+1,
…: partitions, sampling and initialization change with it), evaluated on the held-out set. Every run
has its own directory under ``--out`` (``select/`` and ``runs/``); a run whose directory already holds a
summary with the same settings is reused, so an interrupted comparison continues where it stopped.
``--server-app 'a|b'`` (several ServerApps, e.g. a server optimizer at several step sizes) is chosen the same
way: each app chooses its rate, the app with the best validation accuracy runs the seeds, and its name joins
the runs' directory names.
``lab.compare_report`` turns the run directories into ``compare.csv``, ``compare.md`` and the plots.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("fedsb.compare")

RANK_EXAMPLE = "fed-sb=16|32|64,fedit=4|8"
LR_EXAMPLE = "fed-sb=2.5e-3|5e-3|1e-2,fedit=1e-3|2e-3|4e-3"


def parse_grid(text: str, flag: str, cast: Callable[[str], Any], methods: list[str], example: str) -> dict[str, list]:
    """``fed-sb=16|32,fedit=4`` → {"fed-sb": [16, 32], "fedit": [4]}. Bad input raises ValueError naming
    ``flag`` and the fix."""
    out: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, eq, values = (s.strip() for s in part.partition("="))
        if not eq or not name or not values:
            raise ValueError(f"{flag}: {part!r} is not METHOD=VALUE or METHOD=VALUE|VALUE|...; e.g. {flag} '{example}'")
        if name not in methods:
            raise ValueError(f"{flag}: method {name!r} is not among --methods ({', '.join(methods)}); add it there "
                             "or drop it here")
        if name in out:
            raise ValueError(f"{flag}: {name!r} is given twice; put all its values in one METHOD=V1|V2|... part")
        vals = []
        for v in values.split("|"):
            try:
                x = cast(v.strip())
            except ValueError:
                raise ValueError(f"{flag}: {v.strip()!r} (for {name}) is not a {cast.__name__}; e.g. {flag} "
                                 f"'{example}'") from None
            if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
                raise ValueError(f"{flag}: {v.strip()!r} (for {name}) must be a positive number")
            vals.append(x)
        if len(set(vals)) != len(vals):
            raise ValueError(f"{flag}: {name} lists a value twice ({values}); give each once")
        out[name] = sorted(vals)
    return out


def parse_ranks(text: str, methods: list[str] | None = None) -> dict[str, list[int]]:
    from fedsb.config import METHODS

    return parse_grid(text, "--rank", int, methods or list(METHODS), RANK_EXAMPLE)


def parse_lrs(text: str, methods: list[str] | None = None) -> dict[str, list[float]]:
    from fedsb.config import METHODS

    return parse_grid(text, "--lr", float, methods or list(METHODS), LR_EXAMPLE)


@dataclass(frozen=True)
class RunSpec:
    """One run of the comparison: a selection run (``split = "validation"``) or a final one (``"test"``)."""

    method: str
    rank: int
    lr: float
    seed: int
    split: str
    server_app: str = ""  # "module:attr" when --server-app names several to choose among (else "": the name is as before)

    @property
    def name(self) -> str:
        app = f"-{self.server_app.rpartition(':')[2]}" if self.server_app else ""
        return f"{self.method}-r{self.rank}-lr{self.lr:g}{app}-s{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return out / ("select" if self.split == "validation" else "runs") / self.name


@dataclass
class Comparison:
    """What to run; ``run`` executes it (skipping finished runs) and returns the per-run rows."""

    methods: list[str]
    num_supernodes: int
    out: Path
    overrides: dict[str, Any]
    ranks: dict[str, list[int]]
    lrs: dict[str, list[float]]
    seeds: int = 1
    validation_fraction: float = 0.1
    select_rounds: int = 0  # 0: as many rounds as the final runs
    max_extend: int = 2
    # where each run executes: Flower's Ray simulation (clients in parallel processes, as `fedsb simulate`), or
    # lab.inprocess_grid (the same ServerApp and ClientApp, clients one after another in this process: no Ray,
    # so several comparisons can share a machine, one process each)
    backend: str = "ray"
    # "module:attr" of another ServerApp (e.g. a strategy wrapped in Flower's DP wrapper); "a|b|c": several, chosen
    # on validation like the rate (e.g. a server optimizer's step size, one ServerApp each)
    server_app: str = ""
    # --method-config: run-config keys of one method only, on top of the shared overrides (e.g. Fed-SB with
    # quantized uploads and downloads beside a float32 baseline)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedsb.config import METHODS, FedSBConfig

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown or empty {unknown}; accepted: {', '.join(METHODS)}")
        if self.seeds < 1:
            raise ValueError(f"--seeds: got {self.seeds}; give the number of seeds, 1 or more")
        if self.backend not in ("ray", "inprocess"):
            raise ValueError(f"--backend: got {self.backend!r}; use 'ray' or 'inprocess'")
        self.server_apps = [a.strip() for a in self.server_app.split("|") if a.strip()]
        if any(":" not in a for a in self.server_apps):
            raise ValueError(f"--server-app: got {self.server_app!r}; give module:attribute (or several joined by |), "
                             "e.g. bench.compose:user_dp")
        if len(self.server_apps) > 1 and self.validation_fraction == 0:
            raise ValueError("--server-app: choosing among several ServerApps needs a validation split; set "
                             "--validation-fraction > 0 (e.g. 0.1) or give one")
        if self.select_rounds < 0 or self.max_extend < 0:
            raise ValueError("--select-rounds and --max-extend must be >= 0")
        if not 0 <= self.validation_fraction < 0.5:
            raise ValueError(f"--validation-fraction: got {self.validation_fraction}; must be in [0, 0.5)")
        if self.validation_fraction == 0 and any(len(v) > 1 for v in self.lrs.values()):
            raise ValueError("--lr: choosing among several rates needs a validation split; set "
                             "--validation-fraction > 0 (e.g. 0.1) or give one rate per method")
        for flag, given in [("--run-config", self.overrides), *(
                (f"--method-config {m}", o) for m, o in self.method_overrides.items())]:
            for key in ("method", "rank", "learning-rate", "output-dir", "eval-split", "validation-fraction"):
                if key in given:
                    raise ValueError(f"{flag}: {key} is set by compare itself (use --methods, --rank, --lr, --out, "
                                     "--validation-fraction); remove it")
        base = FedSBConfig.from_run_config(self.overrides)  # bad keys fail now, not an hour in
        for method, extra in self.method_overrides.items():
            if method not in self.methods:
                raise ValueError(f"--method-config: method {method!r} is not among --methods ({', '.join(self.methods)}); "
                                 "add it there or drop its --method-config")
            try:
                FedSBConfig.from_run_config({**self.overrides, **extra, "method": method})
            except ValueError as e:
                raise ValueError(f"--method-config {method}: {e}") from None
        self.base_seed, self.rounds = base.seed, base.num_server_rounds
        self.default_rank, self.default_lr = base.rank, base.learning_rate

    def run_config(self, spec: RunSpec) -> dict[str, Any]:
        cfg = dict(self.overrides, **self.method_overrides.get(spec.method, {}), method=spec.method, rank=spec.rank, seed=spec.seed,
                   **{"learning-rate": spec.lr, "validation-fraction": self.validation_fraction,
                      "eval-split": spec.split, "output-dir": str(spec.run_dir(self.out).resolve())})
        if spec.split == "validation" and self.select_rounds:
            cfg["num-server-rounds"] = self.select_rounds
        return cfg

    def execute(self, spec: RunSpec) -> dict:
        """The run's summary: from its directory if it already finished with these settings, else by running it."""
        from fedsb.config import FedSBConfig
        from server.simulation import simulate

        cfg = self.run_config(spec)
        summary = spec.run_dir(self.out) / "summary.json"
        if summary.is_file():
            have = json.loads(summary.read_text())
            want = FedSBConfig.from_run_config({k: v for k, v in cfg.items() if k != "output-dir"}).to_run_config()
            differ = [k for k, v in want.items() if k != "output-dir" and have["config"].get(k, v) != v]
            if differ:
                raise ValueError(f"--out: {summary.parent} holds a finished run with other settings ({', '.join(differ)});"
                                 " give a new --out or delete that directory")
            log.info("compare: %s (%s) already finished; kept", spec.name, spec.split)
            return have
        log.info("=== compare: %s on %s ===", spec.name, spec.split)
        server_app = None
        if spec.server_app or self.server_apps:
            module, attr = (spec.server_app or self.server_apps[0]).split(":", 1)
            server_app = getattr(importlib.import_module(module), attr)
        if self.backend == "inprocess":
            from lab.inprocess_grid import run_inprocess

            run_inprocess(cfg, self.num_supernodes, server_app=server_app)
        else:
            simulate(cfg, self.num_supernodes, server_app=server_app)
        return json.loads(summary.read_text())

    def choose_lr(self, method: str, rank: int, server_app: str = "", always: bool = False) -> float:
        """The rate with the best validation accuracy, the grid extended until it is not at an edge (with
        ``always``, a single rate runs its validation run too: ``choose`` compares ServerApps by it)."""
        lr, _ = self._choose_lr(method, rank, server_app, always)
        return lr

    def _choose_lr(self, method: str, rank: int, server_app: str, always: bool) -> tuple[float, float]:
        lrs = sorted(self.lrs.get(method, [self.default_lr]))
        if len(lrs) == 1 and not always:
            return lrs[0], math.nan
        acc = {}
        for extension in range(self.max_extend + 1):
            for lr in lrs:
                if lr not in acc:
                    s = self.execute(RunSpec(method, rank, lr, self.base_seed, "validation", server_app))
                    a = s.get("final_accuracy")
                    acc[lr] = a if isinstance(a, (int, float)) and math.isfinite(a) else -math.inf
            best = max(lrs, key=lambda x: (acc[x], -x))  # ties: the smaller rate
            if len(lrs) == 1 or lrs[0] < best < lrs[-1] or extension == self.max_extend:
                break
            new = best * 2 if best == lrs[-1] else best / 2
            log.info("compare: %s r=%d best lr %g is at the grid's edge; trying %g", method, rank, best, new)
            lrs = sorted([*lrs, new])
        if len(lrs) > 1 and best in (lrs[0], lrs[-1]):
            log.warning("compare: %s r=%d best lr %g is still at the edge of %s after %d extensions",
                        method, rank, best, lrs, self.max_extend)
        return best, acc[best]

    def choose(self, method: str, rank: int) -> tuple[float, str]:
        """(rate, ServerApp) for the final runs: with several ServerApps, each chooses its rate and the one with
        the best validation accuracy is kept (ties: the first given); with one or none, the app is not in the
        runs' names."""
        if len(self.server_apps) < 2:
            return self.choose_lr(method, rank), ""
        scored = [(*self._choose_lr(method, rank, app, always=True), app) for app in self.server_apps]
        lr, acc, app = max(scored, key=lambda t: (t[1], -self.server_apps.index(t[2])))
        log.info("compare: %s r=%d chose %s at lr %g (validation accuracy %.4f)", method, rank, app, lr, acc)
        return lr, app

    def run(self) -> list[dict]:
        from lab.compare_report import summarize

        self.out.mkdir(parents=True, exist_ok=True)
        for method in self.methods:
            for rank in self.ranks.get(method, [self.default_rank]):
                lr, app = self.choose(method, rank)
                for k in range(self.seeds):
                    self.execute(RunSpec(method, rank, lr, self.base_seed + k, "test", app))
        return summarize(self.out)


__all__ = ["Comparison", "RunSpec", "parse_grid", "parse_lrs", "parse_ranks"]
