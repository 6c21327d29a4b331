"""BENCHMARKS.md sections of issue 31 (the zero-byte basis and quantized uploads on the default run) and of issue
28 (Fed-SB inside Flower's user-level DP wrapper and inside ServerAdam). Rendered by ``bench.report`` from
``bench/results/frontier-<part>/compare.csv`` (``bench.frontier``'s parts) and ``bench/results/weights_basis.json``."""

from __future__ import annotations

from bench.report_common import R, _load, _missing
from bench.report_variants import _mean_std, _versus, traffic_table


def _arms(part: str, split: str = "test") -> dict[str, list[dict]] | None:
    """The part's merged runs on ``split`` (held-out "test", or the selection runs' "validation"), by arm."""
    from lab.compare_report import read_rows

    p = R / f"frontier-{part}" / "compare.csv"
    if not p.exists():
        return None
    arms: dict[str, list[dict]] = {}
    for r in read_rows(p):
        if r["split"] == split:
            arms.setdefault(r["method"], []).append(r)
    return arms


def _commands(part: str) -> list[str]:
    p = R / f"frontier-{part}" / "commands.txt"
    return [f"- `{c}`" for c in p.read_text().splitlines() if c] if p.exists() else []


def uploads_section() -> list[str]:
    from bench.frontier import PARTS

    out = ["## The default run with a zero-byte basis and quantized uploads", ""]
    arms = _arms("default-uploads")
    if not arms:
        return out + _missing("python -m bench.frontier --part default-uploads")
    spec = PARTS["default-uploads"]
    out += ["The default configuration (`make run`: 10 clients, 4 a round, 10 rounds, rank 32), each arm's keys added; "
            "the float32 arms chose their rate on a 5% validation split, the quantized ones keep their float32 arm's "
            "rate (the rate is tuned per method and rank; the rounding is unbiased). Commands "
            "(`python -m bench.frontier --part default-uploads`; `bench.sweep` runs them in parallel):", "",
            *_commands("default-uploads"), "",
            "| arm | keys | lr | held-out accuracy (mean ± std) | upload / client / round | × float32 floor | "
            "one-time bytes / client | total bytes |", "|---|---|---|---|---|---|---|---|"]
    for arm, rs in arms.items():
        r0 = rs[0]
        floor = 4 * r0["communicated_params"]  # the float32 floor: 4 bytes a communicated number
        ratio = f"{r0['bytes_up_per_client_round'] / floor:.3f}"
        out.append(f"| {arm} | `{spec['arms'][arm][2] or 'defaults'}` | {r0['lr']:g} | "
                   f"{_mean_std([r['final_accuracy'] for r in rs])} | {r0['bytes_up_per_client_round']:,.0f} | {ratio} | "
                   f"{sum(r['bytes_one_time'] for r in rs) / len(rs) / 10:,.0f} | "
                   f"{sum(r['bytes_total'] for r in rs) / len(rs):,.0f} |")
    ref = [r["final_accuracy"] for r in arms.get("fed-sb", [])]
    out += ["", "Each arm against the default (`fed-sb`, the clients' gradient basis, float32 uploads):", ""]
    out += [f"- {_versus(arm, [r['final_accuracy'] for r in rs], 'fed-sb', ref)}" for arm, rs in arms.items() if arm != "fed-sb"]
    pairs = [(q, f) for q, f in (("fed-sb-int8", "fed-sb"), ("fed-sb-int4", "fed-sb"), ("fed-sb-weights-int8", "fed-sb-weights"),
                                 ("fed-sb-weights-int8-both", "fed-sb-weights")) if q in arms and f in arms]
    if pairs:
        out += ["", "Each quantized arm against its float32 arm (the same basis):", ""]
        out += [f"- {_versus(q, [r['final_accuracy'] for r in arms[q]], f, [r['final_accuracy'] for r in arms[f]])}"
                for q, f in pairs]
    missing = [a for a in spec["arms"] if a not in arms or len(arms[a]) < 3]
    if missing:
        out += ["", f"**Incomplete:** {', '.join(missing)} (fewer than 3 seeds; "
                f"`python -m bench.frontier --part default-uploads --arms {','.join(missing)}` resumes them)."]
    out += [""] + agreement_lines() + traffic_lines(arms)
    return out + [""]


TRAFFIC_CMD = ("fedsb compare --methods fed-sb,fedit --rank fed-sb=32,fedit=24 --lr fed-sb=1e-2 --validation-fraction 0.05 "
               "--num-supernodes 10 --method-config fed-sb \"init-basis='weights' upload-dtype='int8' download-dtype='int8'\" "
               "--backend inprocess --out runs/traffic-zero")


def traffic_lines(arms: dict[str, list[dict]]) -> list[str]:
    """Issue 31: the default run's total bytes, zero-byte basis and int8 both ways, against FedIT r=24 (float32),
    measured in one comparison; the accuracy side over seeds comes from the default-uploads arm of the same keys."""
    import csv

    path = R / "traffic_zero_compare.csv"
    out = ["### Total traffic with the zero-byte basis and int8 transfers against FedIT r=24", ""]
    if not path.exists():
        return out + _missing(TRAFFIC_CMD)
    rows = {r["method"]: r for r in csv.DictReader(path.open()) if r["split"] == "test"}
    out += [f"Command: `{TRAFFIC_CMD}` (then `compare.csv` copied to `bench/results/traffic_zero_compare.csv`): the "
            "default configuration for both, seed 42, identical partitions; Fed-SB with `init-basis=weights "
            "upload-dtype=int8 download-dtype=int8` at its default-run rate, FedIT r=24 as it is (float32).", "",
            *traffic_table(rows.values())]
    if {"fed-sb", "fedit"} <= rows.keys():
        ratio = int(rows["fed-sb"]["bytes_total"]) / int(rows["fedit"]["bytes_total"])
        out += ["", f"Fed-SB's total is {ratio:.4f} of FedIT's, 1/{1 / ratio:.0f} (goal ≤ 1/50: "
                f"{'met' if ratio <= 1 / 50 else 'unmet'})."]
    both, ref = arms.get("fed-sb-weights-int8-both", []), arms.get("fed-sb", [])
    accs = [r["final_accuracy"] for r in both]
    out += ["", "Its accuracy over seeds against today's default (`fed-sb`, float32 both ways, the clients' gradient "
            "basis), from the default-uploads arm `fed-sb-weights-int8-both` (the same keys): "
            + (_versus("fed-sb-weights-int8-both", accs, "fed-sb", [r["final_accuracy"] for r in ref])
               if len(accs) > 1 else f"{len(accs)} seed(s) run, no statement over seeds yet") + "."]
    return out + [""]


def agreement_lines() -> list[str]:
    wb = _load("weights_basis.json")
    if not wb:
        return _missing("python -m bench.weights_basis --from-runs runs/frontier-*")
    out = ["The weights basis in the runs (`python -m bench.weights_basis --from-runs runs/frontier-*`, from each "
           "run's summary.json): every node computes B and A from its own W0 and checks the server's fingerprint; "
           "one that disagrees is sent the matrices (the fallback).", "",
           "| basis, rank, basis dtype | runs | nodes in them | fallbacks | machines | fingerprints across machines |",
           "|---|---|---|---|---|---|"]
    for key, g in wb.items():
        across = {None: "one machine only", True: "equal", False: f"{g['distinct_fingerprints']} different"}
        out.append(f"| {key} | {g['runs']} | {g['nodes_in_runs']} | {g['fallback_nodes']} | {'; '.join(g['machines'])} | "
                   f"{across[g['agree_across_machines']]} |")
    return out + [""]


def _eps(rows: list[dict]) -> str:
    eps = sorted({round(float(r["epsilon"]), 3) for r in rows if r.get("epsilon") not in (None, "")})
    return ", ".join(f"{e:g}" for e in eps) or "not reported"


def _server_app(row: dict) -> str:
    """The ServerApp a run chose on validation, from its directory's name (``...-lr0.01-adam_1e_2-s42``)."""
    name = str(row["run_dir"]).rstrip("/").rsplit("/", 1)[-1]
    return next((p for p in name.split("-") if p.startswith("adam_")), "")


def _majority(arms: dict[str, list[dict]]) -> list[str]:
    """The held-out set's majority-class share over the arms' runs (the split moves with the seed)."""
    m = [float(r["majority_rate"]) for rs in arms.values() for r in rs if r.get("majority_rate") not in (None, "")]
    if not m:
        return []
    share = f"{min(m):.3f}" + (f"–{max(m):.3f}" if max(m) > min(m) else "")
    return ["", f"The held-out set's majority class is {share} of it over these runs (the split moves with the seed): "
            "the accuracy of a model that learned nothing."]


def _adam_selection() -> list[str]:
    """Each ServerAdam arm's validation runs: the accuracy of every step size tried, the plain arm's at its rate."""
    arms = _arms("server-adam", "validation") or {}
    out = []
    for m in ("fed-sb", "fedit"):
        tried = sorted((float(_server_app(r).removeprefix("adam_").replace("_", "-")), r["final_accuracy"])
                       for r in arms.get(f"{m}-adam", []))
        if tried:
            lr = arms[f"{m}-adam"][0]["lr"]
            plain = [r["final_accuracy"] for r in arms.get(m, []) if r["lr"] == lr]
            out.append(f"- {m}-adam's validation accuracy by server step (seed 42, client lr {lr:g}): "
                       + ", ".join(f"{eta:g}: {a:.3f}" for eta, a in tried)
                       + (f"; plain averaging at that rate: {plain[0]:.3f}" if plain else "") + ".")
    return out


def composition_section() -> list[str]:
    from bench.compose import DELTA, NOISE_MULTIPLIER
    from bench.frontier import ADAM_STEPS

    out = ["## Fed-SB in Flower's own wrappers: user-level DP and a server optimizer", ""]
    dp = _arms("user-dp")
    out += [f"User-level DP: `bench/compose.py`'s `user_dp` ServerApp wraps the strategy in Flower's "
            "`DifferentialPrivacyServerSideAdaptiveClipping` (noise multiplier "
            f"{NOISE_MULTIPLIER:g}, adaptive clipping), ε from `server.dp.CentralDPEpsilon` (RDP, δ = {DELTA:g}); "
            "100 clients, 10 a round, 30 rounds, the same noise, sample and rounds (so the same ε) for both methods; "
            "each method's client rate chosen on a 5% validation split (15-round selection runs), then 3 seeds. The "
            "first selection runs ran on an NVIDIA H200 over the in-process backend, the rest on this 2-core machine "
            "(each run's summary.json names its versions).", ""]
    if dp:
        out += _commands("user-dp") + ["", "| arm | rank | lr | held-out accuracy (mean ± std) | ε (δ = 1e-5) | "
                                       "upload / client / round |", "|---|---|---|---|---|---|"]
        out += [f"| {arm} | {rs[0]['rank']} | {rs[0]['lr']:g} | {_mean_std([r['final_accuracy'] for r in rs])} | "
                f"{_eps(rs)} | {rs[0]['bytes_up_per_client_round']:,.0f} |" for arm, rs in dp.items()]
        out += _majority(dp)
        if {"fed-sb", "fedit"} <= dp.keys():
            out += ["", "- " + _versus("fed-sb", [r["final_accuracy"] for r in dp["fed-sb"]], "fedit",
                                       [r["final_accuracy"] for r in dp["fedit"]])]
        short = [a for a in ("fed-sb", "fedit") if len(dp.get(a, [])) < 3]
        if short:
            out += ["", f"**Incomplete:** {', '.join(short)} (fewer than 3 seeds; `python -m bench.frontier --part user-dp` "
                    "resumes them)."]
    else:
        out += _missing("python -m bench.frontier --part user-dp")
    adam = _arms("server-adam")
    out += ["", "ServerAdam (`server/fedopt.py`, FedAdam's step on the aggregate) against plain averaging, on the "
            "frontier's task (10 clients, 2 a round, 10 rounds) split non-IID (`partitioner=dirichlet`, α = 0.5). The "
            "plain arms choose their client rate on validation; each ServerAdam arm keeps its plain arm's rate and "
            f"chooses the server step size among {', '.join(f'{v:g}' for v in ADAM_STEPS.values())} on validation "
            "(`fedsb compare --server-app 'a|b|c'`), then 3 seeds.", ""]
    if adam:
        out += _commands("server-adam") + ["", "| arm | rank | client lr | server step (chosen) | held-out accuracy "
                                           "(mean ± std) |", "|---|---|---|---|---|"]
        out += [f"| {arm} | {rs[0]['rank']} | {rs[0]['lr']:g} | "
                f"{ADAM_STEPS[_server_app(rs[0]).removeprefix('adam_')] if _server_app(rs[0]) else 'none (averaging)'} | "
                f"{_mean_std([r['final_accuracy'] for r in rs])} |" for arm, rs in adam.items()]
        out += [""] + [f"- {_versus(f'{m}-adam', [r['final_accuracy'] for r in adam[f'{m}-adam']], m, [r['final_accuracy'] for r in adam[m]])}"
                       for m in ("fed-sb", "fedit") if {m, f"{m}-adam"} <= adam.keys()]
        out += _adam_selection() + _majority(adam)
        short = [a for a in ("fed-sb", "fed-sb-adam", "fedit", "fedit-adam") if 0 < len(adam.get(a, [])) < 3]
        unrun = [a for a in ("fed-sb", "fed-sb-adam", "fedit", "fedit-adam") if not adam.get(a)]
        if short:
            out += ["", f"**Incomplete:** {', '.join(short)} (fewer than 3 seeds; `python -m bench.frontier --part "
                    f"server-adam --arms {','.join(short)}` resumes them)."]
        if unrun:
            out += ["", f"**Not run yet:** {', '.join(unrun)} (the same comparison for FedIT, whose pseudo-gradient is "
                    f"not the exact mean of the clients' products; `python -m bench.frontier --part server-adam --arms "
                    f"{','.join(unrun)}`)."]
    else:
        out += _missing("python -m bench.frontier --part server-adam")
    return out + [""]


__all__ = ["agreement_lines", "composition_section", "uploads_section"]
