"""Flower ClientApp: ``fedsb-init``/``hello``/``basis`` queries, local training, local evaluation.

Thin glue: the handlers are ``client.handlers.FedSBClient``'s; SecAgg+ is a mod around training.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.handlers import FedSBClient, train_reply_content
from client.secagg import is_legacy, legacy_to_plain, plain_to_legacy, secagg_if_asked

app = ClientApp()
fedsb_client = FedSBClient()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return fedsb_client.query(msg, context)


@app.train(mods=[secagg_if_asked])
def train(msg: Message, context: Context) -> Message:
    if is_legacy(msg):  # a SecAgg+ round (legacy FitIns)
        return plain_to_legacy(fedsb_client.train(legacy_to_plain(msg), context), msg)
    return fedsb_client.train(msg, context)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    return fedsb_client.evaluate(msg, context)


__all__ = ["app", "query", "train", "evaluate_local", "train_reply_content", "secagg_if_asked"]
