"""A server optimizer step as a strategy wrapper: FedAdam (Reddi et al., "Adaptive Federated Optimization")
on whatever the wrapped strategy aggregates, e.g. ``ServerAdam(FedSB(cfg))``.

The pseudo-gradient is ``Δ = aggregate − current``. For Fed-SB it is exact (the mean of the clients' R
is the R of the mean update, since B and A are shared); for FedIT it is not (mean(B)·mean(A) is not the
mean update). Flower's own ``FedAdam`` subclasses ``FedAvg`` and cannot sit on another strategy's
aggregate, so its step is written here, term for term the same (bias-corrected step size included).
Its moments go into the run's checkpoint (``server_state``): a resumed run continues them bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


class ServerAdam(Strategy):
    def __init__(self, strategy: Strategy, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3):
        self.strategy, self.eta, self.beta_1, self.beta_2, self.tau = strategy, eta, beta_1, beta_2, tau
        self.streams_replies = getattr(strategy, "streams_replies", False)  # replies pass through untouched
        self.current: dict[str, np.ndarray] = {}
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        sent = getattr(self.strategy, "sent_arrays", lambda: None)()  # download-dtype int8/int4: the round's
        self.current = {k: a.numpy().copy() for k, a in (sent or arrays).items()}  # global is what was sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregate, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregate is None or not self.current or self.current.keys() != aggregate.keys() or any(
                self.current[k].shape != a.numpy().shape for k, a in aggregate.items()):
            return aggregate, metrics  # nothing to step from (e.g. arrays given before the basis existed)
        delta = {k: a.numpy() - self.current[k] for k, a in aggregate.items()}
        self.m = {k: self.beta_1 * self.m.get(k, 0.0) + (1 - self.beta_1) * d for k, d in delta.items()}
        self.v = {k: self.beta_2 * self.v.get(k, 0.0) + (1 - self.beta_2) * d**2 for k, d in delta.items()}
        eta_norm = self.eta * np.sqrt(1 - self.beta_2 ** (server_round + 1.0)) / (1 - self.beta_1 ** (server_round + 1.0))
        new = {k: (x + eta_norm * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(x.dtype)
               for k, x in self.current.items()}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()}), metrics

    def server_state(self) -> dict[str, np.ndarray]:
        """The moments, for the checkpoint that ``FedSB.start()`` writes each round (``server.run_dir``)."""
        return {**{"m." + k: x for k, x in self.m.items()}, **{"v." + k: x for k, x in self.v.items()}}

    def load_server_state(self, state: Mapping[str, np.ndarray]) -> None:
        """The moments of ``server_state``, on resume."""
        self.m = {k[2:]: np.array(x) for k, x in state.items() if k.startswith("m.")}
        self.v = {k[2:]: np.array(x) for k, x in state.items() if k.startswith("v.")}

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None, *args, outer=None,
              **kwargs) -> Result:
        """The wrapped strategy's own run (FedSB's: run directory and all), its rounds through this wrapper."""
        return self.strategy.start(grid, initial_arrays, num_rounds, *args, outer=outer or self, **kwargs)
