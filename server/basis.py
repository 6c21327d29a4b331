"""The Fed-SB basis protocol (DESIGN.md §2, steps 1-2): compute B, A once, ship them to each node once.

``initialize`` asks the sampled nodes for their init gradients (or draws a seeded random basis), runs
the update approximation and fixes the basis and its fingerprint; ``attach`` adds the basis to the
message of a node that does not hold it yet. Only methods with ``needs_basis`` use this.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsb import adapters
from fedsb.adapters.sb_init import apply_bases, compute_bases, random_bases
from fedsb.aggregation.validation import InvalidReply, ReplySpec, check_reply
from fedsb.run.export import head_state
from fedsb.wire import (MESSAGE_CONFIG_DEFAULTS, basis_tensors, encode_basis, flatten, layers_fingerprint, round_basis,
                        unflatten_into)
from server.transport import arrays, arrays_of, nbytes

if TYPE_CHECKING:
    from server.driver import FedSBServer

log = logging.getLogger("fedsb.server")


class BasisProtocol:
    def __init__(self, server: "FedSBServer"):
        self.server = server
        self.state = server.state  # fingerprint, basis vector and holders live in the run state

    # -- step 1: the basis --------------------------------------------------------------------
    def initialize(self, nodes: list[int]) -> None:
        """Average the clients' init gradients, update approximation, SVD -> B, A, R0 (or, with
        init-basis=random, a seeded random basis and no query)."""
        srv, cfg, t0 = self.server, self.server.cfg, time.time()
        names = srv.task.layer_names
        layers = {n: srv.model.get_submodule(n) for n in names}  # the SB layers the method put there
        shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
        if cfg.init_basis == "random":  # no query: nothing about the clients' data goes into the basis
            self.install(random_bases(shapes, cfg.rank, cfg.seed))
            srv.rec.log(0, "init", clients=0, bytes_up=0, bytes_down=0, seconds=round(time.time() - t0, 3),
                        fingerprint=self.state.fingerprint, init_basis="random")
            return
        nodes = srv.ordered(nodes)
        k = max(1, math.ceil(cfg.init_fraction * len(nodes)))
        rng = np.random.default_rng(cfg.seed)
        asked = [nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=min(k, len(nodes)), replace=False))]
        head = arrays(head=flatten(head_state(srv.model)))

        def content_for(node: int) -> RecordDict:
            config = {"mode": "fed-sb-init", "layers": names, "dp-delta": MESSAGE_CONFIG_DEFAULTS["dp-delta"],
                      **srv.hook_config(node)}
            return RecordDict({"config": ConfigRecord(config), "head": head})

        total = sum(m * n for m, n in shapes.values())
        # each client sums the gradient over at most init-samples examples; a larger claimed count would
        # shrink everyone else's share of the mean gradient
        spec = ReplySpec(shapes={"grads": (total,)}, max_num_examples=cfg.init_samples)
        grad_sum, count, rejected = np.zeros(total, np.float64), 0, []
        totals = self.state.totals
        down_before = totals["bytes_down"]

        def on_reply(node: int, reply: Message, up: int) -> None:
            nonlocal count
            if reply.has_error():
                rejected.append({"node": int(node), "reason": "failed", "detail": reply.error.reason})
                return
            try:
                got = check_reply(spec, arrays_of(reply, "grads"), reply.content["metrics"].get("num-examples"), None)
            except (InvalidReply, KeyError) as e:
                rejected.append(reject(node, e))
                return
            grad_sum[:] += reply.content["grads"]["grads"].numpy()  # streamed: one reply in memory at a time
            count += got
            srv.observe(node, reply)
            totals["bytes_init_total"] += up

        srv.transport.send(asked, MessageType.QUERY, content_for, "init", on_reply)
        if count == 0:
            raise RuntimeError(f"no valid initialization gradients (rejected: {rejected})")
        grads, offset = {}, 0
        for n, (m, k_) in shapes.items():
            grads[n] = torch.from_numpy(grad_sum[offset : offset + m * k_].reshape(m, k_))
            offset += m * k_
        self.install(compute_bases(grads, count, cfg.rank, scale=cfg.scale, update=cfg.init_update,
                                   lr=cfg.init_lr, svd=cfg.init_svd, seed=cfg.seed))
        srv.rec.log(0, "init", clients=len(asked), accepted=len(asked) - len(rejected), rejected=rejected,
                    bytes_up=totals["bytes_init_total"], bytes_down=totals["bytes_down"] - down_before,
                    examples=count, seconds=round(time.time() - t0, 3), fingerprint=self.state.fingerprint)

    def install(self, bases: dict) -> None:
        for b in bases.values():  # what the clients will hold after the broadcast in basis-dtype
            b.B, b.A = round_basis(b.B, self.server.cfg.basis_dtype), round_basis(b.A, self.server.cfg.basis_dtype)
        apply_bases(adapters.adapter_layers(self.server.model), bases)
        self.refresh()

    def restore(self, vec: np.ndarray, fingerprint: str) -> None:
        unflatten_into(basis_tensors(adapters.adapter_layers(self.server.model)), vec)
        self.refresh()
        if self.state.fingerprint != fingerprint:
            raise RuntimeError("checkpoint basis does not reproduce its fingerprint: the file is corrupt")

    def refresh(self) -> None:
        layers = adapters.adapter_layers(self.server.model)
        self.state.basis = flatten(basis_tensors(layers))
        self.state.fingerprint = layers_fingerprint(self.server.task.model_path, self.server.cfg.rank, layers)

    # -- step 2: the one-time broadcast ---------------------------------------------------------
    def record(self) -> RecordDict:
        return RecordDict({"basis": arrays(**encode_basis(self.state.basis, self.server.cfg.basis_dtype))})

    def attach(self, node: int, content: RecordDict) -> int:
        """Add the basis to ``content`` if ``node`` does not hold it; returns the bytes it added."""
        if node in self.state.basis_holders:
            return 0
        content["basis"] = self.record()["basis"]
        self.state.basis_holders.add(node)
        return nbytes(RecordDict({"basis": content["basis"]}))

    def forget(self, nodes: list[int]) -> None:
        """These nodes lost the basis (restart, wiped state): the next message to them carries it again."""
        self.state.basis_holders.difference_update(nodes)


def reject(node: int, e: Exception) -> dict:
    reason = getattr(e, "reason", "missing-key")
    log.warning("reply from node %d rejected (%s): %s", node, reason, e)
    return {"node": int(node), "reason": reason, "detail": str(e)}
