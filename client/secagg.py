"""SecAgg+ on the client: Flower's ``secaggplus_mod`` around the train handler, and the conversion between
a SecAgg+ round's legacy FitIns/FitRes and the plain train message the handler understands."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message

from fedsb.wire import from_legacy_scalars, to_legacy_scalars


def secagg_if_asked(msg: Message, context, call_next):
    """SecAgg+ (Flower's secaggplus_mod) for the messages of a SecAgg+ round, a no-op for the others."""
    from flwr.client.mod import secaggplus_mod

    if "secaggplus_configs" in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_legacy(msg: Message) -> bool:
    return "fitins.parameters" in msg.content.array_records


def legacy_to_plain(msg: Message) -> Message:
    """A SecAgg+ round's FitIns as the plain train message the handler understands."""
    import numpy as np
    from flwr.app import Array
    from flwr.common import parameters_to_ndarrays

    from client.flower_private import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    vec = parameters_to_ndarrays(fitins.parameters)[0]
    msg.content["adapter"] = ArrayRecord({"adapter": Array(np.ascontiguousarray(vec))})
    msg.content["config"] = ConfigRecord(from_legacy_scalars(fitins.config))
    return msg


def plain_to_legacy(reply: Message, msg: Message) -> Message:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from client.flower_private import recorddict_compat as compat

    c = reply.content
    if c["config"].get("status") != "ok":
        raise RuntimeError(f"cannot take part in this SecAgg+ round: {c['config'].get('status')} "
                           f"{c['config'].get('reason', '')}".rstrip())
    metrics = to_legacy_scalars(dict(c["metrics"]))  # lists (the DP history) travel as JSON text
    metrics["fingerprint"] = c["config"]["fingerprint"]
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([c["adapter"]["adapter"].numpy()]),
                    int(c["metrics"]["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
