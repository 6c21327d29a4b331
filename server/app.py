"""Flower ServerApp: the Fed-SB protocol (DESIGN.md §2), driven by ``server.driver.FedSBServer``."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsb.config import FedSBConfig
from server.driver import FedSBServer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per log push otherwise
    FedSBServer(grid, FedSBConfig.from_run_config(context.run_config)).run()
