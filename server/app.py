"""Flower ServerApp: the Fed-SB protocol (DESIGN.md §2), driven by ``server.driver.FedSBServer``."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsb.config import FedSBConfig
from fedsb.logs import configure as configure_logging
from server.driver import FedSBServer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()  # fedsb's loggers only: the root stays quiet (alembic, Ray, ...)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per log push otherwise
    FedSBServer(grid, FedSBConfig.from_run_config(context.run_config)).run()
