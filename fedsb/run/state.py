"""The server's run state: one dataclass that the checkpoint writes and reads symmetrically (cf. nanoGPT).

Everything a resumed run needs to continue bit for bit lives here, beside the model's global vector, the
basis and the method's own tensors. ``to_checkpoint`` and ``from_checkpoint`` are each other's inverse.
The metrics history is not part of it: it lives in metrics.jsonl, which a resumed run reads back
(``RunRecorder.resume``), so a checkpoint's size does not grow with the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsb.run.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _totals() -> dict[str, int]:
    return {"bytes_up": 0, "bytes_down": 0, "bytes_basis_total": 0, "bytes_init_total": 0}


@dataclass
class RunState:
    round: int = 0  # last completed round (0: initialized)
    config: dict[str, Any] = field(default_factory=dict)  # the run config it was made with
    global_vec: np.ndarray | None = None  # what the method's trainables hold (R + head, ...)
    basis: np.ndarray | None = None  # Fed-SB: B and A, flat
    fingerprint: str | None = None
    method_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    method_nodes: dict[str, Any] = field(default_factory=dict)  # the method's per-node bookkeeping (JSON)
    # what the strategies wrapping the server's keep across rounds (a server optimizer's moments), by "depth.name"
    wrapper_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    basis_holders: set[int] = field(default_factory=set)  # nodes that were sent the current basis
    partition_of: dict[int, int] = field(default_factory=dict)  # node id -> partition id (from hello)
    totals: dict[str, int] = field(default_factory=_totals)
    dp_history: dict[int, list[float]] = field(default_factory=dict)  # partition -> flat [σ, q, steps, ...]
    dp_sigma: dict[int, float] = field(default_factory=dict)
    up_per_client_round: list[float] = field(default_factory=list)

    def to_checkpoint(self, path: str | Path) -> None:
        tensors = {"global": torch.from_numpy(np.array(self.global_vec, dtype=np.float32))}
        if self.basis is not None:
            tensors["basis"] = torch.from_numpy(np.array(self.basis, dtype=np.float32))
        tensors.update({"method." + k: v for k, v in self.method_tensors.items()})
        tensors.update({"wrapper." + k: v for k, v in self.wrapper_tensors.items()})
        state = {
            "round": self.round, "config": self.config, "fingerprint": self.fingerprint,
            "basis_holders": sorted(self.basis_holders), "partition_of": _str_keys(self.partition_of),
            "totals": self.totals, "dp_history": _str_keys(self.dp_history), "dp_sigma": _str_keys(self.dp_sigma),
            "up_per_client_round": self.up_per_client_round, "rng": rng_state(),
            **self.method_nodes,
        }
        save_checkpoint(path, tensors, state)

    @classmethod
    def from_checkpoint(cls, path: str | Path, method_node_keys: tuple[str, ...] = ()) -> "RunState":
        """Read a checkpoint (and restore the process's random generators to what they were then)."""
        tensors, state = load_checkpoint(path)
        out = cls(
            round=int(state["round"]), config=state["config"], fingerprint=state["fingerprint"],
            global_vec=tensors["global"].numpy(), basis=tensors["basis"].numpy() if "basis" in tensors else None,
            method_tensors={k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
            method_nodes={k: state[k] for k in method_node_keys if k in state},
            wrapper_tensors={k[len("wrapper."):]: v for k, v in tensors.items() if k.startswith("wrapper.")},
            basis_holders=set(state["basis_holders"]), partition_of=_int_keys(state.get("partition_of", {})),
            totals=state["totals"], dp_history=_int_keys(state.get("dp_history", {})),
            dp_sigma=_int_keys(state.get("dp_sigma", {})), up_per_client_round=state["up_per_client_round"],
        )
        set_rng_state(state["rng"])
        return out


def _str_keys(d: dict) -> dict:
    return {str(k): v for k, v in d.items()}


def _int_keys(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}
