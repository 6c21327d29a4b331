"""In-process Flower simulation of the same ServerApp/ClientApp (``fedsb simulate``, tests, ``compare``).

Flower's deprecated ``run_simulation`` takes no run config, so this uses the simulation runtime it
wraps: the full, validated config is written as the app config of a throw-away app directory, which
is how every simulated ClientApp and the ServerApp receive the same ``context.run_config``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from fedsb.config import FedSBConfig

log = logging.getLogger("fedsb.simulation")


def parse_run_config(text: str) -> dict[str, Any]:
    """Parse Flower's ``--run-config "k=v k2='s'"`` syntax (values are TOML scalars)."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text])) if text and text.strip() else {}
    except click.ClickException as e:  # Flower's CLI error: one line here too
        raise ValueError(f"--run-config {text!r}: {e.format_message()} Quote strings: key='value'") from None


def simulate(overrides: Mapping[str, Any], num_supernodes: int, *, cpus_per_client: float = 1.0,
             gpus_per_client: float = 0.0, verbose: bool = False, client_app=None, server_app=None) -> Path:
    """Run one simulated federation; returns the run directory. Raises if the run failed."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    custom_server_app = server_app
    if server_app is None:
        from server.app import app as server_app
    if client_app is None:
        from client.app import app as client_app

    cfg = FedSBConfig.from_run_config(dict(overrides))  # bad config fails here, before Ray starts
    if not cfg.output_dir:
        import time

        cfg = cfg.replace(output_dir=str(Path(f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()))
    else:
        cfg = cfg.replace(output_dir=str(Path(cfg.output_dir).expanduser().resolve()))
    from fedsb.preflight import preflight

    # every error it can know of, before Flower starts and before any directory exists (the model and data of
    # fedsb's own apps: another ServerApp may bring its own Task)
    preflight(cfg, num_supernodes, model_and_data=custom_server_app is None)
    full = cfg.to_run_config()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # Ray's "Tip: In future versions of Ray..." about GPU env vars on every start: it describes Ray's future,
    # not this run (clients with --gpus-per-client 0 see no GPU, as now)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    with tempfile.TemporaryDirectory(prefix="fedsb-app-") as app_dir:
        project = {
            "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
            "project": {"name": "fedsb-sim", "version": "0.1.0", "dependencies": []},
            "tool": {"flwr": {"app": {
                "publisher": "fedsb",
                "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                "config": full,
            }}},
        }
        (Path(app_dir) / "pyproject.toml").write_text(tomli_w.dumps(project))
        run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
        run = Run.create_empty(run_id=run_id)
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        try:
            from flwr.supercore.constant import NOOP_FEDERATION_ID

            run.federation_id = NOOP_FEDERATION_ID
        except ImportError:  # pragma: no cover
            pass
        ctx = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(full))
        backend = {
            # a fraction of a GPU per client lets several simulated clients share one GPU
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        }
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend,
            server_app_context=ctx,
            app_dir=app_dir,
            is_app=True,  # makes every simulated node read its run config from app_dir
            run=run,
            verbose_logging=verbose,
        )
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'summary.json'}: the run failed (see log)")
    return run_dir
