"""A ServerApp that wraps ``FedSB`` in Flower's own server-side DP wrapper, or in ``ServerAdam``
(tests/test_strategy.py)."""

from __future__ import annotations

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

from fedsb.config import FedSBConfig
from server.dp import CentralDPEpsilon
from server.fedopt import ServerAdam
from server.strategy import FedSB

NOISE = 0.5
SEEN: dict = {}  # what the test reads back: the server app runs in the test's process


class RecordingFedSB(FedSB):
    """Keeps each round's aggregate as FedSB computed it, before the wrapper noises it."""

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        SEEN.setdefault("before", {})[server_round] = self.tally.global_vec.copy()
        return messages

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        SEEN.setdefault("clean", {})[server_round] = None if arrays is None else np.array(arrays["adapter"].numpy())
        return arrays, metrics


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedSBConfig.from_run_config(context.run_config)
    fedsb = RecordingFedSB(cfg)
    if context.run_config["output-dir"].endswith("adam"):  # a server optimizer around FedSB
        SEEN["wrapper"] = adam = ServerAdam(fedsb, eta=0.05)
        SEEN["result"] = adam.start(grid=grid)
        return
    population = cfg.min_available_nodes
    fedsb.hooks.add(CentralDPEpsilon(NOISE, population, population, delta=1e-5))
    dp = DifferentialPrivacyServerSideAdaptiveClipping(fedsb, noise_multiplier=NOISE, num_sampled_clients=population,
                                                       initial_clipping_norm=0.5, clipped_count_stddev=1.0)
    SEEN["wrapper"], SEEN["fedsb"] = dp, fedsb
    if context.run_config.get("output-dir", "").endswith("flower-loop"):  # Flower's own loop: no run directory
        SEEN["result"] = dp.start(grid=grid, initial_arrays=fedsb.global_arrays(), num_rounds=cfg.num_server_rounds)
    else:  # the same rounds inside FedSB's start(): run directory, checkpoints, summary
        SEEN["result"] = fedsb.start(grid=grid, outer=dp)
