"""Flower ServerApp: builds the strategy from the typed run config and starts it."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedsb.config import FedSBConfig
from fedsb.logs import configure as configure_logging
from fedsb.tasks import Task
from server.dp import DPAccounting
from server.secagg import SecAggFedSB
from server.strategy import FedSB

app = ServerApp()


def strategy_for(cfg: FedSBConfig, task: Task | None = None) -> Strategy:
    """``FedSB`` (its SecAgg+ variant with secagg=true), wrapped in DP accounting with dp=true."""
    strategy = (SecAggFedSB if cfg.secagg else FedSB)(cfg, task)
    return DPAccounting(strategy) if cfg.dp else strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()  # fedsb's loggers only: the root stays quiet (alembic, Ray, ...)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per log push otherwise
    cfg = FedSBConfig.from_run_config(context.run_config)
    strategy_for(cfg).start(grid=grid, num_rounds=cfg.num_server_rounds)
