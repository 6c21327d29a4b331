"""ServerApps for the composition benchmarks (issue 28): fedsb's strategy inside Flower's own user-level DP
wrapper, and inside the FedAdam server optimizer, for any method (Fed-SB or a baseline).

    fedsb compare --server-app bench.compose:user_dp ...      # DifferentialPrivacyServerSideAdaptiveClipping
    fedsb compare --server-app bench.compose:adam_1e_2 ...    # ServerAdam, server step size 1e-2

User-level DP: one client's whole update per round is what is protected. Flower's wrapper clips each
reply's update (its arrays minus the round's global arrays: R and the head for Fed-SB, both LoRA factors
and the head for FedIT) to an adaptive norm and adds Gaussian noise to the aggregate; it keeps no
accountant, so ``server.dp.CentralDPEpsilon`` composes that Gaussian mechanism over the rounds (RDP, the
sampling rate of the rounds' fixed-size sample) and writes ε per round and in summary.json's
``central_dp``. Every method runs with the same noise multiplier, sample and rounds, so the same ε.
"""

from __future__ import annotations

import math

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

from bench.frontier import ADAM_STEPS
from fedsb.config import FedSBConfig
from fedsb.logs import configure as configure_logging
from server.app import strategy_for
from server.dp import CentralDPEpsilon
from server.fedopt import ServerAdam

NOISE_MULTIPLIER = 1.0  # of the aggregate's noise, relative to the clipping norm (Flower's wrapper's z)
DELTA = 1e-5


def _strategy(context: Context):
    configure_logging()
    cfg = FedSBConfig.from_run_config(context.run_config)
    if cfg.dp or cfg.secagg:
        raise ValueError("bench.compose: run without dp/secagg (these apps add the server-side wrapper themselves)")
    return cfg, strategy_for(cfg)


user_dp = ServerApp()


@user_dp.main()
def _user_dp(grid: Grid, context: Context) -> None:
    cfg, strategy = _strategy(context)
    population = cfg.min_available_nodes  # the benchmark sets it to the number of simulated clients
    sampled = min(population, max(cfg.min_train_nodes, math.ceil(cfg.fraction_train * population)))
    strategy.hooks.add(CentralDPEpsilon(NOISE_MULTIPLIER, sampled, population, delta=DELTA))
    # The clipped-count query shares the budget (Andrew et al.): Flower's default stddev, sampled/20, is too
    # small for z = 1 with few clients sampled (the update's noise would need a negative variance); σ_b = z
    # leaves the update 1.15·z, whatever the sample size.
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        strategy, noise_multiplier=NOISE_MULTIPLIER, num_sampled_clients=sampled,
        clipped_count_stddev=max(sampled / 20, NOISE_MULTIPLIER))
    strategy.start(grid=grid, outer=wrapper)


def _adam_app(eta: float) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _adam(grid: Grid, context: Context) -> None:
        _, strategy = _strategy(context)
        ServerAdam(strategy, eta=eta).start(grid=grid)

    return app


for _name, _eta in ADAM_STEPS.items():
    globals()[f"adam_{_name}"] = _adam_app(_eta)
