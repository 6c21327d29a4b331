"""Every name fedsb takes from Flower's non-public API, in one place (server/ and client/ import them from here).

Flower promises nothing about these: a release may move or change any of them without a deprecation.
Each is resolved on first use, and a missing one raises an ImportError that names this module and the
Flower version; ``tests/test_flower_api.py`` resolves every one, and checks that no other project module
imports anything from Flower but its public API. Each entry says why no public API does the job (Flower
1.41). Lazy, so a process that only needs one of them (the ServerApp: the wire size) never imports the
simulation runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that holds it today
PRIVATE = {
    # `fedsb simulate` / `fedsb compare`: the public flwr.simulation.run_simulation takes no run config and
    # no app directory; its private core does, which is how every simulated node receives the validated
    # config as its context.run_config. That core needs a Run and a task identity like the ones a
    # SuperLink creates, with ids drawn the way the SuperLink draws them.
    "_run_simulation": "flwr.simulation.run_simulation",
    "Run": "flwr.supercore.run",
    "TaskIdentity": "flwr.supercore.task_identity",
    "generate_rand_int_from_bytes": "flwr.server.superlink.linkstate.utils",
    "RUN_ID_NUM_BYTES": "flwr.common.constant",
    "TASK_ID_NUM_BYTES": "flwr.common.constant",
    "SUPERLINK_NODE_ID": "flwr.common.constant",
    "NOOP_FEDERATION_ID": "flwr.supercore.constant",
    # Flower's own `--run-config "k=v k2='s'"` parser: `fedsb simulate --run-config` reads what `flwr run` reads.
    "parse_config_args": "flwr.common.config",
    # The size of a message as serialized on the wire (what the run records as communication).
    "recorddict_to_proto": "flwr.common.serde",
    # SecAgg+ exists only in Flower's legacy stack (SecAggPlusWorkflow on a LegacyContext, secaggplus_mod on
    # FitIns/FitRes): a Grid's nodes become legacy client proxies, messages convert to and from FitIns/FitRes.
    "GridClientProxy": "flwr.server.compat.grid_client_proxy",
    "recorddict_compat": "flwr.compat.common",
    # lab/inprocess_grid.py (the in-process Grid of the tests and of `fedsb compare --backend inprocess`) does
    # what Flower's runtimes do to a message: the node config keys and error code they set, their protobuf
    # serializers (every message crosses a wire copy) and the SuperLink's reply validator. Flower exposes
    # none of these publicly, and ships no synchronous in-process Grid.
    "NUM_PARTITIONS_KEY": "flwr.common.constant",
    "PARTITION_ID_KEY": "flwr.common.constant",
    "ErrorCode": "flwr.common.constant",
    "context_from_proto": "flwr.common.serde",
    "context_to_proto": "flwr.common.serde",
    "message_from_proto": "flwr.common.serde",
    "message_to_proto": "flwr.common.serde",
    "validate_message": "flwr.server.utils.validator",
}

__all__ = sorted(PRIVATE)


def __getattr__(name: str) -> Any:
    if name not in PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = PRIVATE[name]
    try:
        module = importlib.import_module(where)
        value = getattr(module, name) if hasattr(module, name) else importlib.import_module(f"{where}.{name}")
    except ImportError as e:
        from importlib.metadata import version

        raise ImportError(
            f"client/flower_private.py: Flower {version('flwr')} has no {where}.{name} any more (a non-public "
            "name fedsb uses; see that module for why). Install the Flower version pyproject.toml's lock "
            "names (requirements.lock), or port client/flower_private.py to this Flower.") from e
    globals()[name] = value  # resolved once
    return value
