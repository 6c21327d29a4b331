"""Render BENCHMARKS.md from bench/results/*.json (no number in it is typed by hand).

    python -m bench.report
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.report_common import R, _b, _command, _f, _load, _missing  # noqa: F401
from bench.report_variants import deploy_section, init_section, llm_section, nested_section, precision_section
from bench.report_frontier import frontier_section, pooler_section
from bench.report_uploads import composition_section, uploads_section
from bench.report_compare import compare_section, private_section


def main() -> None:
    out = ["# fedsb benchmarks", "",
           "Every figure below is rendered by `python -m bench.report` from the JSON that the command beside it",
           "wrote into `bench/results/`. Machine: the project's CPU machine (2 cores, 24 GiB, no GPU), shared and",
           "noisy: timings are medians of interleaved repeats, and the results are ratios measured side by side.", ""]

    comm = _load("comm.json")
    out += ["## Wire bytes per client per round vs the floor", "",
            "Command: `python -m bench.comm` (Fed-SB rank 32, LoRA baselines rank 8, FLoRA stack of 4 clients).",
            "Measured from the serialized Flower message contents the apps build (`client.app.train_reply_content`,",
            "the server's records), against the raw floor of 4 bytes per number (`r²·layers + head` for Fed-SB).",
            "Goal: Fed-SB ≤ 1.10× the floor.", ""]
    if comm:
        out += ["| method | rank | numbers up | floor up (B) | measured up (B) | ratio | measured down (B) |", "|---|---|---|---|---|---|---|"]
        for r in comm["rows"]:
            out.append(f"| {r['method']} | {r['rank']} | {_b(r['numbers_up'])} | {_b(r['floor_up_bytes'])} | "
                       f"{_b(r['measured_up_bytes'])} | {r['ratio_up']:.4f} | {_b(r['measured_down_bytes'])} |")
        fs = comm["rows"][0]
        out += ["", f"Fed-SB's upload is {fs['ratio_up']:.4f}× its floor: **goal {'met' if fs['ratio_up'] <= 1.10 else 'not met'}** (all R matrices and the head",
                "travel as one flat float32 array, so Flower's per-array framing is paid once). FedEx-LoRA's download",
                "carries the dense residual (m·n per layer) every round; FLoRA's the stacked factors of all clients.", ""]
        if "measured_up_int8_bytes" in fs:
            out += ["Quantized uploads (`upload-dtype=int8|int4`: the update in codes with a float32 scale per trainable "
                    "tensor, measured in the reply the ClientApp builds), against the same float32 floor (goals: int8 ≤ "
                    "0.27×, int4 ≤ 0.14×):", "", "| method | rank | int8 up (B) | × floor | int4 up (B) | × floor |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['method']} | {r['rank']} | {_b(r['measured_up_int8_bytes'])} | {r['ratio_up_int8']:.4f} | "
                    f"{_b(r['measured_up_int4_bytes'])} | {r['ratio_up_int4']:.4f} |" for r in comm["rows"]]
            ok = all(r["ratio_up_int8"] <= 0.27 and r["ratio_up_int4"] <= 0.14 for r in comm["rows"])
            out += ["", f"Every method: int8 ≤ 0.27× and int4 ≤ 0.14× of its float32 floor: **{'met' if ok else 'not met'}**.", ""]
        out += ["## One-time costs", "", "Command: `python -m bench.comm`. Default model, measured vs the formula",
                "(basis `4·r·(m+n)` per layer, init gradient `4·m·n` per layer):", "",
                "| what | measured (B) | formula (B) |", "|---|---|---|",
                f"| basis B, A (float32), per node | {_b(fs['basis_measured_bytes'])} | {_b(fs['basis_formula_bytes'])} |",
                f"| basis as bfloat16 (`basis-dtype=bfloat16`), per node | {_b(fs['basis_bf16_measured_bytes'])} | {_b(fs['basis_formula_bytes'] // 2)} |",
                f"| init gradient upload, per client | {_b(fs['init_gradient_measured_bytes'])} | {_b(fs['init_gradient_formula_bytes'])} |",
                "", "Extrapolated by the same formula (checked above to within framing) to the paper's models and ranks:", "",
                "| model | rank | adapted layers | Fed-SB upload / round | basis float32 | basis bfloat16 | init gradient |",
                "|---|---|---|---|---|---|---|"]
        for m, e in comm["extrapolated"].items():
            out.append(f"| {m} | {e['rank']} | {e['layers']} | {_b(e['fed_sb_up_per_round_bytes'])} | {_b(e['basis_bytes_float32'])} | "
                       f"{_b(e['basis_bytes_bfloat16'])} | {_b(e['init_gradient_bytes'])} |")
        out += ["", "The init gradient dominates the one-time cost (a dense m×n per layer from each queried client);",
                "`init-fraction` queries only a sampled subset of clients, and `basis-dtype=bfloat16` halves the",
                "broadcast; their measured effect on accuracy is in the Options section below.", ""]
    else:
        out += _missing("python -m bench.comm")

    ov = _load("overhead.json")
    out += ["## Adapter overhead", "", "Command: `python -m bench.overhead` (batch 16, seq 64, default model, one AdamW step).", ""]
    if ov:
        res = ov["results"]
        label = {"fed-sb": f"fed-sb r={ov['fed_sb_rank']}", "fed-sb-plain": f"fed-sb r={ov['fed_sb_rank']}, plain path",
                 "lora": f"lora r={ov['lora_rank']}"}
        out += ["| variant | trainable params | median step (s) | vs no-adapter | vs frozen-backward |", "|---|---|---|---|---|"]
        for k in ("no-adapter", "frozen-backward", "fed-sb", "fed-sb-plain", "lora"):
            if k in res:
                out.append(f"| {label.get(k, k)} | {_b(ov['trainable_params'].get(k))} | {res[k]['median_s']:.4f} | "
                           f"{res[k]['median_s'] / res['no-adapter']['median_s']:.2f}× | "
                           f"{res[k]['median_s'] / res['frozen-backward']['median_s']:.2f}× |")
        r_na, r_fb = ov["ratio_fed_sb_vs_no_adapter"], ov["ratio_fed_sb_vs_frozen_backward"]
        out += ["", f"Goal ≤ 1.15× the no-adapter step: **{'met' if r_na <= 1.15 else 'not met'}** ({r_na:.2f}×). The no-adapter",
                "step trains only the head, so its backward stops at the classifier; any adapter needs the backward",
                "through all six blocks, and that alone (`frozen-backward`: the frozen base, no adapter, the full backward)",
                f"costs {res['frozen-backward']['median_s'] / res['no-adapter']['median_s']:.2f}× the no-adapter step. Against that "
                f"reference Fed-SB costs {r_fb:.2f}× "
                f"(≤ 1.15×: **{'met' if r_fb <= 1.15 else 'not met'}**) and standard LoRA at a similar budget "
                f"{ov['ratio_lora_vs_frozen_backward']:.2f}×.", ""]
        if "fed-sb-plain" in res:
            out += [f"Fed-SB's default path computes each adapted layer as one matmul with `W0 + s·B·R·A` and a hand-written",
                    "backward that gives R only its r×r gradient (`fedsb.adapters.layers._SBFused`); the plain path (base layer, then",
                    "x·Aᵀ, ·Rᵀ, ·Bᵀ as modules — what Opacus' per-sample hooks need, so DP-SGD uses it) costs "
                    f"{ov['ratio_fed_sb_plain_vs_frozen_backward']:.2f}× the frozen-backward step.", ""]
    else:
        out += _missing("python -m bench.overhead")

    dp = _load("dp_overhead.json")
    out += ["## DP overhead", "", "Command: `python -m bench.dp_overhead` (10 steps, batch 16, seq 64, Fed-SB r=32 on the default model).", ""]
    if dp:
        out += ["| mode | median of 10 steps (s) | vs plain |", "|---|---|---|"]
        for k, v in dp["results"].items():
            out.append(f"| {k} | {v['median_s']:.3f} | {dp['ratios'][k]:.3f}× |")
        hooks = dp["ratios"].get("dp-hooks")
        out += ["", f"Goal ≤ 1.3×: **{'met' if hooks and hooks <= 1.3 else 'not met'}** with the default `grad-sample-mode=hooks` "
                f"({_f(hooks)}×): per-sample gradients are needed only for R and the head.", ""]
    else:
        out += _missing("python -m bench.dp_overhead")

    ic = _load("init_cost.json")
    out += ["## Initialization cost", ""]
    if ic and "init_in_train_steps" in ic:
        counts = ic["init_samples"]
        out += [f"Command: `python -m bench.init_cost --init-samples {','.join(map(str, counts))}` (rank {ic['rank']}, "
                f"{ic['layers']} layers, batches of {ic['batch_size']}, against one Fed-SB training step of the same batch).", ""]
        res = ic["results"]
        out += ["| part | median (s) |", "|---|---|"] + [f"| {k} | {v['median_s']:.3f} |" for k, v in res.items()]
        out += ["", "| init-samples | init (exact SVD) in training steps | init (randomized SVD) in training steps | goal ≤ 2 |", "|---|---|---|---|"]
        for k in counts:
            st = ic["init_in_train_steps"][str(k)]
            out.append(f"| {k} | {st['exact']:.1f} | {st['randomized']:.1f} | {'met' if min(st.values()) <= 2 else 'not met'} |")
        out += ["", "Accumulating the gradient is a forward and a backward with full weight gradients per batch of examples,",
                "so the default `init-samples=64` is four such batches: it runs once per run (seconds), on each queried client.",
                "Randomized vs exact SVD: the randomized rank-r error exceeds the optimal (Eckart–Young) error by "
                f"{ic['randomized_svd_excess_error_median']:.2e} (median over layers; max {ic['randomized_svd_excess_error_max']:.2e}).", ""]
    else:
        out += _missing("python -m bench.init_cost")

    sc = _load("scale.json")
    out += ["## Scale", "", "Command: `python -m bench.scale` (tiny BERT, every client sampled, 1 local step"
            + (f", {sc['rounds']} rounds)." if sc else ")."),
            "Server seconds per round and the server process's peak allocation during a round (tracemalloc).", ""]
    if sc:
        # round 1 apart: Fed-SB also ships the basis then
        out += ["| clients | method | round 1 seconds | later rounds seconds (median) | server peak during a round (B) | upload / client (B) |",
                "|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            out.append(f"| {r['clients']} | {r['method']} | {r['round_seconds'][0]:.2f} | {statistics.median(r['round_seconds'][1:]):.2f} | "
                       f"{_b(r['server_peak_bytes_max'])} | {_b(r['bytes_up_per_client'])} |")
        rs = {(r["clients"], r["method"]): r for r in sc["rows"]}
        lo, hi = min(r["clients"] for r in sc["rows"]), max(r["clients"] for r in sc["rows"])
        growth = rs[(hi, "fed-sb")]["server_peak_bytes_max"] / rs[(lo, "fed-sb")]["server_peak_bytes_max"]
        out += ["", f"The whole server process's peak grows {growth:.0f}× from {lo} to {hi} clients, for Fed-SB and FedIT alike:",
                "it covers what Flower keeps per message in the same process during a simulated round (the in-memory link",
                "state, message objects, per-node contexts) beside fedsb's aggregation, which the next table measures alone.",
                "Round seconds include the clients' own work (two Ray actors on two cores), hence the linear growth.", ""]
    else:
        out += _missing("python -m bench.scale")
    am = _load("aggregation_memory.json")
    out += ["### fedsb's aggregation alone", "",
            "Command: `python -m bench.aggregation_memory` (replies the size of the default model's uploads, validated and",
            "folded one at a time as the strategy's `aggregate_train` does; peak allocation by tracemalloc). The \"hold all",
            "(median)\" rows were measured with fedsb's former median; `aggregation=median` now runs Flower's `FedMedian`,",
            "which also holds every reply (as float64 copies): rerun the command to measure it.", ""]
    if am:
        clients = sorted({r["clients"] for r in am["rows"]})
        paths = sorted({(r["method"], r["numbers"], r["path"]) for r in am["rows"]}, key=lambda t: (t[0], t[2] != "streaming mean"))
        peak = {(r["method"], r["path"], r["clients"]): r["peak_bytes"] for r in am["rows"]}
        out += ["| method (numbers per reply) | path | " + " | ".join(f"{c} clients (B)" for c in clients) + " |",
                "|---|---|" + "---|" * len(clients)]
        for method, numbers, path in paths:
            out.append(f"| {method} ({numbers:,}) | {path} | " + " | ".join(_b(peak.get((method, path, c))) for c in clients) + " |")
        lo, hi = clients[0], clients[-1]
        lines = []
        met = True
        for method, numbers, path in paths:
            if path != "streaming mean":
                continue
            per_client = (peak[(method, path, hi)] - peak[(method, path, lo)]) / (hi - lo)
            met &= per_client < numbers * 4 / 100  # under 1% of one reply per added client
            lines.append(f"{method} {peak[(method, path, hi)] / peak[(method, path, lo)]:.2f}× ({per_client:.0f} B per added client "
                         f"against {numbers * 4:,} B per reply)")
        out += ["", f"Goal (aggregation memory independent of the client count; read here as: each added client costs under 1% of",
                f"one reply): **{'met' if met else 'not met'}** by the streaming mean, the path of Fed-SB, FedIT and FFA-LoRA with",
                f"`aggregation=mean`. From {lo} to {hi:,} clients its peak grows " + "; ".join(lines) + ". What stays is one reply",
                "and `BlockWeightedMean`'s per-entry state (float64 sums and weights, since nested ranks average each entry",
                "over the clients that sent it, and the float32 global vector) with one reply's float64 temporaries; what",
                "grows is one float per client (its example count, kept for the round's metrics). Holding every reply (FedEx-LoRA, FLoRA, median, trimmed mean) grows linearly (`—`: not run, it",
                "would exceed the benchmark's memory cap). So the growth measured in the whole simulated process above is",
                "Flower's per-message state, not fedsb's aggregation.", ""]
    else:
        out += _missing("python -m bench.aggregation_memory")

    out += compare_section() + private_section()

    sm = _load("smollm2.json")
    out += ["## Causal LM: SmolLM2-135M with Fed-SB on GSM-style math", ""]
    if sm:
        s = sm["summary"]
        out += [f"Command: `{sm['command']}`", "", f"Wall time {sm['wall_seconds'] / 60:.1f} min on 2 CPU cores.", "",
                "| round | held-out loss | perplexity | exact match |", "|---|---|---|---|"]
        out += [f"| {e['round']} | {_f(e['loss'])} | {_f(e['perplexity'], 2)} | {_f(e['exact_match'])} |" for e in sm["evaluate"]]
        out += ["", f"Upload per client per round {_b(s['bytes_up_per_client_round'])} B (floor {_b(s['bytes_up_floor_per_client_round'])} B); "
                f"basis {_b(s['bytes_basis_total'])} B in all; init gradients {_b(s['bytes_init_total'])} B in all.", ""]
    else:
        out += _missing("python -m bench.smollm2")

    op = _load("options.json")
    out += ["## Options: SecAgg+, bfloat16 basis, sampled initialization", ""]
    if op:
        out += [_command("options", op) + " (default task; every variant on the same partitions and seeds as the "
                "baseline).", ""]
        base = next(r for r in op["rows"] if r["variant"] == "baseline")
        out += ["| variant | accuracy | upload / round (B) | download / round (B) | train round (s) | basis total (B) | init total (B) |",
                "|---|---|---|---|---|---|---|"]
        for r in op["rows"]:
            out.append(f"| {r['variant']} | {_f(r['final_accuracy'])} | {_b(r['bytes_up_per_round'])} | {_b(r['bytes_down_per_round'])} | "
                       f"{_f(r['train_round_seconds_median'], 1)} | {_b(r['bytes_basis_total'])} | {_b(r['bytes_init_total'])} |")
        sa = next((r for r in op["rows"] if r["variant"] == "secagg"), None)
        if sa:
            out += ["", f"SecAgg+ costs {sa['bytes_up_per_round'] / base['bytes_up_per_round']:.2f}× the upload and "
                    f"{sa['bytes_down_per_round'] / max(1, base['bytes_down_per_round']):.2f}× the download per round "
                    f"(key exchange, shares and the masked vector), and {sa['train_round_seconds_median'] / base['train_round_seconds_median']:.2f}× "
                    "the round time (four round trips instead of one), with the same accuracy: the secure mean equals the",
                    "plain one to within the quantization bound."]
        for name, what in (("basis-bfloat16", "sending the basis in bfloat16"), ("init-fraction-0.34", "asking a third of the clients for init gradients")):
            r = next((r for r in op["rows"] if r["variant"] == name), None)
            if r:
                out += ["", f"{what[0].upper() + what[1:]}: basis {r['bytes_basis_total'] / base['bytes_basis_total']:.2f}× and init gradients "
                        f"{r['bytes_init_total'] / base['bytes_init_total']:.2f}× the baseline's one-time bytes; accuracy "
                        f"{_f(r['final_accuracy'])} vs {_f(base['final_accuracy'])}, held-out loss {r['final_loss']:.4f} vs {base['final_loss']:.4f}."]
        if op.get("partial"):
            out += ["", f"**Incomplete:** {op['partial']}."]
        if op.get("note"):
            out += ["", f"Note: {op['note']}."]
        out.append("")
    else:
        out += _missing("python -m bench.options")

    out += deploy_section()
    out += init_section() + precision_section() + nested_section() + llm_section()
    out += pooler_section() + frontier_section() + uploads_section() + composition_section()
    Path("BENCHMARKS.md").write_text("\n".join(out) + "\n")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
