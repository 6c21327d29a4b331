"""BENCHMARKS.md sections on Fed-SB's variants: init and basis cost (issue 14), half precision (issue 20),
nested ranks (issue 19), the causal-LM task (issue 18). Rendered by ``bench.report``."""

from __future__ import annotations

import statistics

from bench.report_common import _b, _load, _missing


def init_section() -> list[str]:
    """Issue 14: Fed-SB's one-time cost by initialization variant: bytes, basis overlap, accuracy over seeds."""
    by, ov, acc = _load("init_bytes.json"), _load("init_overlap.json"), _load("init_accuracy.json")
    out = ["## Fed-SB's one-time cost by initialization variant", "",
           "Commands: `python -m bench.init_variants bytes` (measured message sizes, default model, rank 32, 36 "
           "layers), `python -m bench.init_variants overlap` (10 default clients × 64 examples, exact SVD) and "
           "`python -m bench.init_variants accuracy` (the default `make run` configuration with the variant's keys, "
           "10 rounds, the whole held-out set, one run per seed).", ""]
    if not by:
        return out + _missing("python -m bench.init_variants bytes")
    runs = {}
    for r in (acc or {}).get("rows", []):
        runs.setdefault(r["variant"], []).append(r["accuracy"])
    out += ["| variant | keys | init upload / asked client | basis download / node | one-time / asked client | = rounds "
            "of R upload | mean over all clients, rounds | held-out accuracy (mean ± std, seeds) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in by["rows"]:
        a = runs.get(r["variant"], [])
        acc_s = (f"{statistics.mean(a):.3f} ± {statistics.stdev(a):.3f} (n={len(a)})" if len(a) > 1 else
                 f"{a[0]:.3f} (n=1)" if a else "not run")
        keys = " ".join(f"{k}={v}" for k, v in r["keys"].items())
        out.append(f"| {r['variant']} | `{keys}` | {_b(r['init_upload_bytes'])} | {_b(r['basis_download_bytes'])} | "
                   f"{_b(r['one_time_bytes'])} | {r['rounds_equivalent']:.1f} | "
                   f"{r.get('rounds_equivalent_mean', r['rounds_equivalent']):.1f} | {acc_s} |")
    out += ["", f"One round's upload of R + head: {_b(by['rows'][0]['round_upload_bytes'])} per client."]
    if ov:
        out += ["", f"Basis overlap with the dense float32 10-client basis (‖B_vᵀ·B_dense‖²_F / r per layer; a random "
                f"subspace gives about {ov['random_overlap_B']:.3f} for B and {ov['random_overlap_A']:.3f} for A):", "",
                "| basis | B median | B min | A median | A min |", "|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r['overlap_B_median']:.3f} | {r['overlap_B_min']:.3f} | {r['overlap_A_median']:.3f} | "
                f"{r['overlap_A_min']:.3f} |" for r in ov["rows"]]
    else:
        out += _missing("python -m bench.init_variants overlap")
    if runs.get("dense-f32"):
        out += ["", "Accuracy against today's dense-gradient float32 basis (`dense-f32`), per variant:", ""]
        out += [f"- {_versus(v, a, 'dense-f32', runs['dense-f32'])}" for v, a in runs.items() if v != "dense-f32"]
    out += _init_decision(by, runs, acc, ov)
    if acc and acc.get("note"):
        out += ["", acc["note"]]
    return out + [""] + traffic_section()


def _init_decision(by: dict, runs: dict[str, list[float]], acc: dict | None, ov: dict | None) -> list[str]:
    """The default's one-time cost against the ≤ 10 rounds goal, and what meets it, from the measured rows."""
    from bench.init_variants import default_variant

    rows = {r["variant"]: r for r in by["rows"]}
    name = default_variant()
    if name not in rows:
        return []
    d, srv = rows[name], rows.get("server-int8")
    keys = " ".join(f"{k}={v}" for k, v in d["keys"].items() if k != "init-source")
    gap, mean = d["rounds_equivalent"] - 10, d.get("rounds_equivalent_mean", d["rounds_equivalent"])
    out = ["", f"The default (`{keys}`, clients' gradients; variant {name}) costs a client that is asked for its init "
           f"signs {_b(d['one_time_bytes'])} B once, {d['rounds_equivalent']:.1f} rounds of its R upload (the basis "
           f"download {d['basis_download_bytes'] / d['round_upload_bytes']:.1f}, the 1-bit init upload "
           f"{d['init_upload_bytes'] / d['round_upload_bytes']:.1f}): the ≤ 10 rounds goal is "
           + (f"**met** ({-gap:.1f} rounds under it)." if gap <= 0 else f"**unmet** by {gap:.1f} rounds.")]
    if d.get("init_share", 1.0) < 1.0:
        out[-1] += (f" Only a share {d['init_share']:g} of the clients is asked, so over all clients the one-time cost is "
                    f"{mean:.1f} rounds on average" + (" (under 10)." if mean <= 10 else ".") + " A client that is not "
                    f"asked pays the basis alone ({d['basis_download_bytes'] / d['round_upload_bytes']:.1f} rounds).")
    if len(runs.get(name, [])) > 1:
        out[-1] += f" Accuracy: {_versus(name, runs[name], 'dense-f32', runs.get('dense-f32', []))}."
        for ref in ("dense-f32", "sign-int8"):
            if ref != name and (diffs := _paired(acc, name, ref)):
                out[-1] += f" Seed by seed against {ref}: {', '.join(f'{x:+.3f}' for x in diffs)}."
    if srv:
        out.append(f"`init-source=server` costs {srv['rounds_equivalent']:.1f} rounds.")
        diffs = _paired(acc, "server-int8", "sign-int8")
        if diffs and len(runs.get("server-int8", [])) > 1:
            out[-1] += (f" Its accuracy is within the seed spread of the dense-gradient basis "
                        if "within" in _versus("s", runs["server-int8"], "d", runs.get("dense-f32", [])) else
                        " Its accuracy is beyond the seed spread of the dense-gradient basis ")
            out[-1] += (f"({_versus('server-int8', runs['server-int8'], 'dense-f32', runs.get('dense-f32', []))}), but "
                        f"seed by seed it {'trailed the clients’ sign vote every time' if all(x < 0 for x in diffs) else 'differed from the clients’ sign vote by'} ({', '.join(f'{x:+.3f}' for x in diffs)}), "
                        + _overlaps(ov) + ". So the default stays `init-source=clients`"
                        + ("; a deployment that counts bytes first should set `init-source=server` (with its own "
                           "`init-dataset`, or the carved slice)." if srv["one_time_bytes"] < 0.9 * d["one_time_bytes"] else
                           f"; with its int8 basis it costs no less than the default ({srv['rounds_equivalent']:.1f} "
                           f"against {d['rounds_equivalent']:.1f} rounds)."))
    return out


def _paired(acc: dict | None, name: str, ref: str) -> list[float]:
    """``name``'s accuracy minus ``ref``'s, seed by seed, over the seeds both ran."""
    rows = (acc or {}).get("rows", [])
    base = {r["seed"]: r["accuracy"] for r in rows if r["variant"] == ref}
    return [r["accuracy"] - base[r["seed"]] for r in sorted(rows, key=lambda r: r["seed"])
            if r["variant"] == name and r["seed"] in base]


def _versus(name: str, vals: list[float], ref_name: str, ref: list[float]) -> str:
    """``name`` against ``ref_name``: the difference of means and whether it exceeds two standard errors of
    the difference (computed from the runs, so the sentence can never disagree with the table)."""
    if len(vals) < 2 or len(ref) < 2:
        return f"{name} vs {ref_name}: fewer than 2 runs each, no statement"
    d, se = _difference(vals, ref)
    verdict = "beyond the seed spread" if abs(d) > 2 * se else "within the seed spread"
    return f"{name} vs {ref_name}: {d:+.3f} (2 SE = {2 * se:.3f}): {verdict}"


def _difference(vals: list[float], ref: list[float]) -> tuple[float, float]:
    """Difference of the means and its standard error (each side needs 2 or more runs)."""
    d = statistics.mean(vals) - statistics.mean(ref)
    return d, (statistics.variance(vals) / len(vals) + statistics.variance(ref) / len(ref)) ** 0.5


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "not run"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n=1)"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} (n={len(vals)})"


def precision_section() -> list[str]:
    """Issue 20: bfloat16 base weights against float32 on the CPU: step time, memory, accuracy over seeds."""
    pr, acc = _load("precision.json"), _load("init_accuracy.json")
    out = ["## Half precision on the CPU (`base-dtype`)", "",
           "Commands: `python -m bench.precision` (one client's local step on the default model, each dtype in a "
           "fresh process, one thread) and `python -m bench.init_variants accuracy` (variants `sign-int8` and "
           "`sign-int8-bf16`: the default run with the frozen base in float32 or bfloat16).", ""]
    if pr:
        out += ["| base dtype | step time (median) | weights | client process peak RSS |", "|---|---|---|---|"]
        out += [f"| {r['base_dtype']} | {r['step_seconds_median']:.3f} s | {_b(r['weight_bytes'])} | "
                f"{_b(r['peak_rss_bytes'])} |" for r in pr["rows"]]
    else:
        out += _missing("python -m bench.precision")
    runs = {}
    for r in (acc or {}).get("rows", []):
        runs.setdefault(r["variant"], []).append(r["accuracy"])
    out += ["", f"Held-out accuracy, float32 base: {_mean_std(runs.get('sign-int8', []))}; bfloat16 base: "
            f"{_mean_std(runs.get('sign-int8-bf16', []))}; "
            f"{_versus('bfloat16', runs.get('sign-int8-bf16', []), 'float32', runs.get('sign-int8', []))}.",
            "", "Untested: the CUDA path. No GPU was lent to the session that built it; the CPU tests cover the keys' "
            "validation, a bfloat16 base training float32 R and head and uploading float32, a federated bfloat16 run, "
            "and a bfloat16-trained PEFT export loading into a float32 base.", ""]
    return out


def nested_section() -> list[str]:
    """Issue 19: a mixed federation of nested ranks against uniform ranks."""
    nr = _load("nested_ranks.json")
    out = ["## Nested ranks: a mixed federation", "", "Command: `python -m bench.nested_ranks` (default model and data, "
           "6 clients, half sampled per round, 6 rounds, the whole held-out set after the last round).", ""]
    if not nr:
        return out + _missing("python -m bench.nested_ranks") + [""]
    runs: dict[str, list[dict]] = {}
    for r in nr["rows"]:
        runs.setdefault(r["variant"], []).append(r)
    out += ["| clients | held-out accuracy (mean ± std) | upload per client per round |", "|---|---|---|"]
    for name, rows in runs.items():
        out.append(f"| {name} | {_mean_std([r['accuracy'] for r in rows])} | "
                   f"{_b(statistics.mean(r['bytes_up_per_client_round'] for r in rows))} |")
    accs = {name: [r["accuracy"] for r in rows] for name, rows in runs.items()}
    mixed = next((n for n in accs if n.startswith("mixed")), None)
    if mixed:
        out += [""] + [f"- {_versus(mixed, accs[mixed], n, a)}" for n, a in accs.items() if n != mixed]
    return out + [""]


def llm_section() -> list[str]:
    """Issue 18: SmolLM2 on a short-answer reasoning task, Fed-SB against FedIT, exact match by round."""
    llm = _load("llm.json")
    out = ["## Causal LM: SmolLM2-135M-Instruct on one-digit sums (reasoning-gym `digit_sum`)", ""]
    if not llm:
        return out + _missing("python -m bench.llm")
    out += ["Each run: the exact match of greedy replies (reasoning-gym's own `score_answer` == 1) on the held-out "
            "problems after each round (round 0: before any local training; for FedIT that is the base model, B = 0; "
            "for Fed-SB it is the base model plus its initialization R0 = S_r/s), the held-out answer loss, what a "
            "client uploads per "
            "round and once, and the wall time on this machine. `PEFT` is the same exact match recomputed by loading "
            "the exported `adapter/peft/` into the base model with plain transformers + peft.", "",
            "| method | rank | lr | exact match by round | held-out loss by round | upload / client / round | one-time / "
            "client | PEFT exact match | wall |", "|---|---|---|---|---|---|---|---|---|"]
    rounds = {}
    for r in llm["rows"]:
        ev = r["evaluate"]
        em = " → ".join(f"{e['exact_match']:.2f}" for e in ev if e.get("exact_match") is not None)
        loss = " → ".join(f"{e['loss']:.2f}" for e in ev)
        s = r["summary"]
        rounds[r["method"]] = (len(ev) - 1, s["bytes_up_per_client_round"], s.get("bytes_one_time_per_client") or 0)
        out.append(f"| {r['method']} | {r['rank']} | {r.get('learning_rate')} | {em} | {loss} | "
                   f"{_b(s['bytes_up_per_client_round'])} | {_b(s.get('bytes_one_time_per_client'))} | "
                   f"{r['peft_exact_match']:.2f} (server: {s['final_exact_match']:.2f}, n={r['generated']}) | "
                   f"{r['wall_seconds'] / 60:.1f} min |")
    by = {r["method"]: r for r in llm["rows"]}
    if "fed-sb" in by:
        ev = by["fed-sb"]["evaluate"]
        rise = ev[-1]["exact_match"] - ev[0]["exact_match"]
        out += ["", f"Fed-SB's exact match rose by {rise:.2f} absolute over {len(ev) - 1} rounds (goal ≥ 0.2: "
                f"{'met' if rise >= 0.2 else 'unmet'}); the PEFT-loaded adapter reproduced the server's final figure"
                f"{'' if by['fed-sb']['peft_exact_match'] == by['fed-sb']['summary']['final_exact_match'] else ' NOT'}."]
        if "fedit" in by:
            out += [f"Fed-SB's initialization (the approximated first full fine-tuning step, init-lr = 1e-3) moved the "
                    f"held-out loss from {by['fedit']['evaluate'][0]['loss']:.2f} (the base model: FedIT's round 0) to "
                    f"{ev[0]['loss']:.2f} before any training. First round with exact match ≥ 0.5: "
                    + ", ".join(f"{m} {next((e['round'] for e in by[m]['evaluate'] if e['exact_match'] >= 0.5), 'none')}"
                                for m in ("fed-sb", "fedit"))
                    + ". One seed and one learning rate per method: no ordering between them is claimed."]
    out += ["", "What one client sends over the whole run (its upload every round, plus its one-time init upload and "
            "basis download): " + "; ".join(f"{m}: {_b(n * up + once)} B" for m, (n, up, once) in rounds.items()) + ".",
            "", "Commands:", ""] + [f"- `{r['command']}`" for r in llm["rows"]]
    for r in llm["rows"]:
        out += ["", f"<details><summary>{r['method']}: generated answers before and after</summary>", "",
                "| prompt (end) | answer | base model | after |", "|---|---|---|---|"]
        cell = lambda t: t.replace("|", "\\|").replace("\n", " ⏎ ").strip()  # noqa: E731
        out += [f"| {cell(e['prompt'].splitlines()[0][-60:])} | {cell(e['answer'])} | {cell(e['before'])} | {cell(e['after'])} |"
                for e in r["examples"]]
        out += ["", "</details>"]
    trials = _load("llm_trials.json")
    if trials:
        out += ["", "Tried first, to choose the default task (Fed-SB, one run each; exact match by round):", ""]
        out += [f"- {r['method']}: " + " → ".join(f"{e['exact_match']:.2f}" for e in r["evaluate"]) + f" (`{r['command']}`)"
                for r in trials["rows"]]
    if llm.get("note"):
        out += ["", llm["note"]]
    return out + [""]


def deploy_section() -> list[str]:
    """Issue 17: a deployment round against a simulation round, and where a client's time goes."""
    from fedsb.ops.deploy import EXECUTOR_ENV

    do = _load("deploy_overhead.json")
    out = ["## Deployment round vs simulation round", ""]
    names = {"deployment_before": "loopback, no data cache", "deployment_after": "loopback, data cache",
             "deployment_warm": "loopback, data cache, warm start", "containers": "containers, data cache, warm start"}
    rows = [(names[k], do[k]) for k in names if do and k in do]
    if not rows:
        return out + _missing("python -m bench.deploy_overhead")
    parts, nodes = ["process-age", "setup", "model", "data", "seconds"], 3
    # what a round spends outside the client's handler: waiting for the SuperNode to pull the message and
    # push the reply, the executor to start the process, the server (medians, so an estimate)
    outside = {name: d["round_seconds_median_later"] - sum(d["client_seconds_median_later"].get(k, 0) for k in parts)
               for name, d in rows}
    out += ["Default model, 3 clients, 10 local steps, TLS and node authentication, a fresh ClientApp process per "
            "message: SuperLink + 3 SuperNodes as processes on loopback, or the committed compose files in containers "
            "(3 SuperNodes and their executors). Each deployment is measured beside a simulation of the same run in "
            "the same invocation, and its ratio is to that one. Medians over rounds 2 and later; the client parts are "
            "medians over replies: process age when the handler starts (process start and imports), setup (config "
            "and task load), model (and basis), data (partition), local training; outside the client is the round "
            "less those parts (the SuperNode pulling the message and pushing the reply, the executor starting the "
            "process, the server's own work; an estimate, from medians).", "",
            "The load column is the machine's 1-minute load average when the command started (an idle 2-core "
            "machine reads well under 1; \"—\" where it was not recorded).", "",
            "| | command | load at start | train round | simulation beside it | ratio | " + " | ".join(parts)
            + " | outside the client |", "|---|---|---|---|---|---|" + "---|" * (len(parts) + 1)]
    for name, d in rows:
        cs, load = d["client_seconds_median_later"], d.get("load_at_start")
        out.append(f"| {name} | `{d['command']}` | {f'{load[0]:.2f}' if load else '—'} | "
                   f"{d['round_seconds_median_later']:.1f} s | "
                   f"{d['simulation']['round_seconds_median_later']:.1f} s | {d['ratio']:.2f}× | "
                   + " | ".join(f"{cs[k]:.2f} s" if k in cs else "—" for k in parts) + f" | {outside[name]:.2f} s |")
    sim = rows[-1][1]["simulation"]["client_seconds_median_later"]
    out += ["", "The simulation's own parts (beside the last row): " + ", ".join(f"{k} {sim[k]:.2f} s" for k in parts if k in sim)
            + ". Its process age is its Ray actor's lifetime (loaded once, reused), not a per-message cost.", "",
            "Goal ≤ 1.3×: " + "; ".join(f"{name} {d['ratio']:.2f}× ({'met' if d['ratio'] <= 1.3 else 'unmet'})"
                                        for name, d in rows if name != names["deployment_before"]) + ".",
            "", "Reading the table: a deployment pays process start and imports and the task load on every message. Each "
            "client's local training takes longer than a simulated client's, because three client processes share the "
            "two cores at once where the simulation runs two actors (so its three clients train in two waves). The "
            "data cache removes the partition and the tokenization; what remains is the fresh process itself."]
    if "deployment_warm" in do and "deployment_after" in do:
        a, w = (do[k]["client_seconds_median_later"] for k in ("deployment_after", "deployment_warm"))
        out += ["", f"Warm start (each ClientApp process forked from a node's process that imported torch and transformers "
                f"once) against the cold data-cached deployment: process age {a['process-age']:.2f} → "
                f"{w['process-age']:.2f} s (process start and imports), setup {a['setup']:.2f} → {w['setup']:.2f} s (what "
                f"is left is reading the model and tokenizer), train round {do['deployment_after']['round_seconds_median_later']:.1f} → "
                f"{do['deployment_warm']['round_seconds_median_later']:.1f} s. The rest of a deployment round is not "
                "the client's: Flower's SuperNode looks for messages every 3 s when idle (a fixed sleep in flwr 1.41), "
                "its ClientApp executor looks for tasks every `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (flwr's default 1 s; "
                f"{EXECUTOR_ENV['FLWR_SUPEREXEC_TASK_POLL_INTERVAL']} s in the compose files and the loopback harness, "
                "`fedsb.ops.deploy.EXECUTOR_ENV`), and three training processes share two cores. A node that "
                "found no message sleeps 3 s, so each picks up the next round's message at a random point of that "
                f"sleep: if their phases are independent, the last of {nodes} nodes waits {3 * nodes / (nodes + 1):.2f} s "
                f"on average (the expected maximum of {nodes} uniform waits), most of the {outside[names['deployment_warm']]:.2f} s that the "
                "warm loopback round spends outside the client. Flower 1.41 has no setting for that sleep "
                "(`flwr/supernode/start_client_internal.py`). The round's training is no longer than the "
                f"simulation's: {w['seconds']:.2f} s for three processes at once, against two waves of "
                f"{do['deployment_warm']['simulation']['client_seconds_median_later']['seconds']:.2f} s. The executor's "
                "poll interval was not measured apart: it can save at most the default 1 s a message, less than "
                "the spread between rounds."]
    if do.get("note"):
        out += ["", do["note"]]
    return out + [""]


def traffic_table(rows) -> list[str]:
    """The per-method traffic table of a comparison's compare.csv rows (as csv.DictReader gives them)."""
    out = ["| method | rank | per-round bytes (up + down, all rounds) | one-time bytes | total | held-out accuracy |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        rounds = int(r["bytes_up_total"]) + int(r["bytes_down_total"])
        out.append(f"| {r['method']} | {r['rank']} | {_b(rounds)} | {_b(int(r['bytes_one_time']))} | "
                   f"{_b(int(r['bytes_total']))} | {float(r['final_accuracy']):.3f} |")
    return out


def traffic_section() -> list[str]:
    """Issue 14: total traffic (one-time + all rounds) of the default run against FedIT r=24, one comparison."""
    import csv

    from bench.report_common import R

    path = R / "traffic_compare.csv"
    out = ["### Total traffic of the default run against FedIT r=24", ""]
    if not path.exists():
        return out + _missing("fedsb compare --methods fed-sb,fedit --rank fed-sb=32,fedit=24 --validation-fraction 0 "
                              "--out runs/traffic")
    rows = {r["method"]: r for r in csv.DictReader(path.open())}
    cmd, *notes = (R / "traffic_compare.cmd").read_text().strip().splitlines()
    ran = "".join(f" Fed-SB's initialization: `{n.split('ran with', 1)[1].strip()}`." for n in notes if "ran with" in n)
    out += [f"Command: `{cmd}` (then `compare.csv` copied to `bench/results/traffic_compare.csv`). Both runs: the "
            "default configuration, 10 clients, 4 sampled per round, 10 rounds, identical partitions and seed." + ran, "",
            *traffic_table(rows.values())]
    if "fed-sb" in rows and "fedit" in rows:
        ratio = int(rows["fed-sb"]["bytes_total"]) / int(rows["fedit"]["bytes_total"])
        out += ["", f"Fed-SB's total is {ratio:.3f} of FedIT's (goal ≤ 0.1: {'met' if ratio <= 0.1 else 'unmet'})."]
        by = {r["variant"]: r for r in (_load("init_bytes.json") or {}).get("rows", [])}
        d, srv = by.get("sign-int8"), by.get("server-int8")
        if d and srv and ratio > 0.1:
            clients = round(int(rows["fed-sb"]["bytes_one_time"]) / d["one_time_bytes"])
            est = int(rows["fed-sb"]["bytes_up_total"]) + int(rows["fed-sb"]["bytes_down_total"]) + clients * srv["one_time_bytes"]
            out += [f"The one-time part is {clients} clients × {_b(d['one_time_bytes'])} B (signs up, int8 basis down). "
                    f"With `init-source=server` it would be {clients} × {_b(srv['one_time_bytes'])} B (basis only), a "
                    f"total of {_b(est)} B = {est / int(rows['fedit']['bytes_total']):.3f} of FedIT's (computed from "
                    "the measured message sizes above, not a separate run)."]
    return out + [""]


def _overlaps(ov: dict | None) -> str:
    rows = {r["variant"]: r for r in (ov or {}).get("rows", [])}
    srv = next((r for n, r in rows.items() if n.startswith("server")), None)
    vote = rows.get("sign vote, 10 clients")
    if not (srv and vote):
        return "and its basis overlap was not measured"
    return (f"and its basis overlaps the dense one less (median over layers, B: {srv['overlap_B_median']:.2f} against "
            f"the sign vote's {vote['overlap_B_median']:.2f})")
