"""Test-only ClientApp: the real one (with SecAgg+), but one partition restarts before round 2 with an
empty basis cache (its node state and its on-disk cache wiped), as a SuperNode that lost its volume."""

from __future__ import annotations

import os
import shutil

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as real
from client.secagg import is_legacy, legacy_to_plain, plain_to_legacy
from fedsb.methods.fed_sb import BASIS_KEY

RESTARTED = (1, 2)  # (partition, the round before which it restarts)

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@app.train(mods=[real.secagg_if_asked])
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    legacy = is_legacy(msg)  # a SecAgg+ round's message
    plain = legacy_to_plain(msg) if legacy else msg
    if (pid, int(plain.content["config"]["round"])) == RESTARTED and BASIS_KEY in context.state:
        del context.state[BASIS_KEY]
        del context.state[BASIS_KEY + "-meta"]
        shutil.rmtree(os.environ["FEDSB_CACHE_DIR"], ignore_errors=True)
    reply = real.fedsb_client.train(plain, context)
    return plain_to_legacy(reply, msg) if legacy else reply
