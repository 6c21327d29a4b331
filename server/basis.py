"""The Fed-SB basis protocol: compute B, A once, ship them to each node once.

``initialize`` fixes the basis and its fingerprint from the sampled nodes' init gradients (dense, or
1 bit per entry and a weighted majority vote), from the server's own data, from a seed, or from the
frozen weights; ``attach`` adds the basis (in basis-dtype, the seed of a random one, nothing for a weights
one) to the message of a node that lacks it.
Only methods with ``needs_basis`` use this.
"""

from __future__ import annotations

import logging
import math
import time
import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsb import adapters
from fedsb.adapters.sb_init import SignVote, accumulate_gradients, apply_bases, compute_bases, random_bases
from fedsb.aggregation.validation import InvalidReply, ReplySpec, check_reply
from fedsb.run.export import head_state
from fedsb.wire import (MESSAGE_CONFIG_DEFAULTS, basis_fingerprint, basis_tensors, encode_basis, flatten,
                        layer_list_fingerprint, layers_fingerprint, round_basis, unflatten_into, unpack_signs)
from fedsb.config import FedSBConfig
from fedsb.methods.fed_sb import WEIGHT_BASES, bases_from_weights
from fedsb.run.state import RunState
from server.hooks import PhaseHooks
from server.nodes import Nodes
from server.transport import Transport, arrays, arrays_of, nbytes

log = logging.getLogger("fedsb.server")


class BasisProtocol:
    def __init__(self, cfg: FedSBConfig, task, model, state: RunState, transport: Transport, nodes: Nodes,
                 hooks: PhaseHooks):
        self.cfg, self.task, self.model, self.transport, self.nodes, self.hooks = cfg, task, model, transport, nodes, hooks
        self.state = state  # fingerprint, basis vector and holders live in the run state
        self.client_peak_memory = None
        self.full_matrices: set[int] = set()  # nodes whose regenerated random basis did not match
        self.fingerprints: dict[int, str] = {}  # nested rank k -> fingerprint of the leading rank-k basis

    # -- step 1: the basis --------------------------------------------------------------------
    def initialize(self, nodes: list[int]) -> dict:
        """Fix B, A, R0: from the clients' init gradients (dense sums, or their signs and a weighted
        majority vote), from the server's own data, or from a seed (init-basis=random). Returns the
        init row of the run's metrics."""
        cfg, t0 = self.cfg, time.time()
        names = self.task.layer_names
        layers = {n: self.model.get_submodule(n) for n in names}  # the SB layers the method put there
        shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
        row = {"init_upload": cfg.init_upload, "init_source": cfg.init_source, "basis_dtype": cfg.basis_dtype}
        if cfg.init_basis == "random":  # no query: nothing about the clients' data goes into the basis
            self.install(random_bases(shapes, cfg.rank, cfg.seed))
            return dict(clients=0, bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3),
                        fingerprint=self.state.fingerprint, init_basis="random", **dict(row, init_upload="none"))
        if cfg.init_basis in WEIGHT_BASES:  # from the server's own W0; each node computes the same from its own
            self.install(bases_from_weights(self.task))
            return dict(clients=0, bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3),
                        fingerprint=self.state.fingerprint, init_basis=cfg.init_basis, **dict(row, init_upload="none"))
        if cfg.init_source == "server":  # the server's own data: no client uploads, no privacy spent
            grads, count = self.server_gradient(names)
            self.install(self.bases(grads, count))
            return dict(clients=0, bytes_up=0, bytes_down=0, examples=count,
                        seconds=round(time.time() - t0, 3), fingerprint=self.state.fingerprint,
                        **dict(row, init_upload="none"))
        grads, count, asked, rejected, down = self.client_gradients(nodes, names, shapes)
        self.install(self.bases(grads, count))
        return dict(clients=len(asked), accepted=len(asked) - len(rejected), rejected=rejected,
                    bytes_up=self.state.totals["bytes_init_total"], bytes_down=down, examples=count,
                    seconds=round(time.time() - t0, 3), fingerprint=self.state.fingerprint,
                    client_peak_memory_bytes=self.client_peak_memory, **row)

    def bases(self, grads: dict, count: int) -> dict:
        cfg = self.cfg
        return compute_bases(grads, count, cfg.rank, scale=cfg.scale, update=cfg.init_update, lr=cfg.init_lr,
                             svd=cfg.init_svd, seed=cfg.seed)

    def server_gradient(self, names: list[str]) -> tuple[dict, int]:
        task = self.task
        model = task.base_model()  # plain layers: the gradient of W0 itself
        data = task.server_dataset()
        loader = task.loader(data.subset(np.arange(min(len(data), self.cfg.init_server_samples))), shuffle=False)
        sums, count = accumulate_gradients(model, names, loader, task.loss_fn)
        return {n: sums[n].double() for n in names}, count

    def client_gradients(self, nodes: list[int], names: list[str], shapes: dict):
        """Ask the sampled nodes for their init gradients and fold each valid reply in as it arrives."""
        cfg = self.cfg
        nodes = self.nodes.ordered(nodes)
        k = max(1, math.ceil(cfg.init_fraction * len(nodes)))
        rng = np.random.default_rng(cfg.seed)
        asked = [nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=min(k, len(nodes)), replace=False))]
        head = arrays(head=flatten(head_state(self.model)))
        layers_fp = layer_list_fingerprint(shapes)

        def content_for(node: int) -> RecordDict:
            config = {"mode": "fed-sb-init", "layers": names, "upload": cfg.init_upload, "layers-fingerprint": layers_fp,
                      "dp-delta": MESSAGE_CONFIG_DEFAULTS["dp-delta"], **self.hooks.config(node)}
            return RecordDict({"config": ConfigRecord(config), "head": head})

        total = sum(m * n for m, n in shapes.values())
        sign = cfg.init_upload == "sign"
        # each client sums the gradient over at most init-samples examples; a larger claimed count would
        # shrink everyone else's share of the mean gradient (or outvote everyone else)
        spec = ReplySpec(shapes={"signs": ((total + 7) // 8,)} if sign else {"grads": (total,)},
                         dtype=np.uint8 if sign else np.float32, fingerprint=layers_fp,
                         max_num_examples=cfg.init_samples)
        vote, grad_sum = (SignVote(total), None) if sign else (None, np.zeros(total, np.float64))
        count, rejected, totals, peak = 0, [], self.state.totals, [0]
        down_before = totals["bytes_down"]

        def on_reply(node: int, reply: Message, up: int) -> None:
            nonlocal count
            if reply.has_error():
                rejected.append({"node": int(node), "reason": "failed", "detail": reply.error.reason})
                return
            key = "signs" if sign else "grads"
            try:
                got = check_reply(spec, arrays_of(reply, key), reply.content["metrics"].get("num-examples"),
                                  reply.content.config_records.get("config", {}).get("layers-fingerprint"))
            except (InvalidReply, KeyError) as e:
                rejected.append(reject(node, e))
                return
            vec = reply.content[key][key].numpy()  # streamed: one reply in memory at a time
            if sign:
                vote.add(unpack_signs(vec, total), got)
            else:
                grad_sum[:] += vec
            count += got
            peak[0] = max(peak[0], int(reply.content["metrics"].get("peak-memory-bytes", 0)))
            self.hooks.observe(node, reply)
            totals["bytes_init_total"] += up

        self.transport.send(asked, MessageType.QUERY, content_for, "init", on_reply)
        if count == 0:
            raise RuntimeError(f"no valid initialization gradients (rejected: {rejected})")
        flat = vote.result() if sign else grad_sum
        grads, offset = {}, 0
        for n, (m, k_) in shapes.items():
            grads[n] = torch.from_numpy(flat[offset : offset + m * k_].reshape(m, k_))
            offset += m * k_
        self.client_peak_memory = peak[0] or None
        return grads, count, asked, rejected, totals["bytes_down"] - down_before

    def install(self, bases: dict) -> None:
        for b in bases.values():  # what the clients will hold after the broadcast in basis-dtype
            b.B, b.A = round_basis(b.B, self.cfg.basis_dtype), round_basis(b.A, self.cfg.basis_dtype)
        apply_bases(adapters.adapter_layers(self.model), bases)
        self.refresh()

    def restore(self, vec: np.ndarray, fingerprint: str) -> None:
        unflatten_into(basis_tensors(adapters.adapter_layers(self.model)), vec)
        self.refresh()
        if self.state.fingerprint != fingerprint:
            raise RuntimeError("checkpoint basis does not reproduce its fingerprint: the file is corrupt")

    def refresh(self) -> None:
        layers = adapters.adapter_layers(self.model)
        self.state.basis = flatten(basis_tensors(layers))
        self.state.fingerprint = layers_fingerprint(self.task.model_id, self.cfg.rank, layers)
        self.fingerprints = {self.cfg.rank: self.state.fingerprint}

    def fingerprint_for(self, node: int) -> str:
        """The fingerprint of the basis ``node`` holds: the leading rank-k block for a node of nested rank k."""
        k = self.nodes.rank(node)
        if k not in self.fingerprints:
            tensors = basis_tensors(adapters.adapter_layers(self.model), k)
            pairs = {n[: -len(".B")]: (tensors[n], tensors[n[: -len(".B")] + ".A"]) for n in tensors if n.endswith(".B")}
            self.fingerprints[k] = basis_fingerprint(self.task.model_id, k, pairs)
        return self.fingerprints[k]

    # -- step 2: the one-time broadcast ---------------------------------------------------------
    def record(self, node: int = -1) -> RecordDict:
        """The basis as a node receives it: a random basis as its seed (every node regenerates the same
        B, A and proves it with the fingerprint), unless that node failed to; else the matrices."""
        cfg = self.cfg
        if cfg.init_basis == "random" and node not in self.full_matrices:
            return RecordDict({"basis": arrays(basis_seed=np.array([cfg.seed], dtype=np.int64))})
        tensors = basis_tensors(adapters.adapter_layers(self.model), self.nodes.rank(node))
        return RecordDict({"basis": arrays(**encode_basis(tensors, cfg.basis_dtype))})

    def attach(self, node: int, content: RecordDict) -> int:
        """Add the basis to ``content`` if ``node`` does not hold it; returns the bytes it added. A weights
        basis adds nothing (the run config tells the node to compute it), unless that node failed to."""
        if node in self.state.basis_holders:
            return 0
        if self.cfg.init_basis in WEIGHT_BASES and node not in self.full_matrices:
            self.state.basis_holders.add(node)
            self.state.totals["basis_sends"] = self.state.totals.get("basis_sends", 0) + 1
            return 0
        content["basis"] = self.record(node)["basis"]
        self.state.basis_holders.add(node)
        self.state.totals["basis_sends"] = self.state.totals.get("basis_sends", 0) + 1
        return nbytes(RecordDict({"basis": content["basis"]}))

    def fallback(self) -> dict:
        """The summary's count of nodes sent the matrices because their own seeded or weights basis differed."""
        if self.cfg.init_basis not in ("random", *WEIGHT_BASES):
            return {}
        reached = len(self.state.basis_holders | self.full_matrices)
        return {"basis_fallback_nodes": len(self.full_matrices),
                "basis_fallback_rate": len(self.full_matrices) / reached if reached else None}

    def forget(self, nodes: list[int], seed_failed: list[int] = ()) -> None:
        """These nodes lost the basis (restart, wiped state): the next message to them carries it again,
        as the matrices for those that could not regenerate it from its seed or their weights."""
        self.state.basis_holders.difference_update(nodes)
        self.full_matrices.update(seed_failed)


def reject(node: int, e: Exception) -> dict:
    reason = getattr(e, "reason", "missing-key")
    log.warning("reply from node %d rejected (%s): %s", node, reason, e)
    return {"node": int(node), "reason": reason, "detail": str(e)}
