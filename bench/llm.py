"""Causal-LM fine-tuning that visibly learns (issue 18): SmolLM2-135M-Instruct on the default causal-LM task
(reasoning-gym one-digit sums and differences, `digit_sum`),
Fed-SB against FedIT, exact match by round, and the exported PEFT adapter scored again with plain
transformers + peft (it must reproduce the server's final figure).

    python -m bench.llm [--methods fed-sb fedit] [--num-supernodes 4] [--run-config "..."]

Results: bench/results/llm.json (rows per method: evaluate records by round, bytes, wall time, the PEFT
check and a few generated answers before and after), saved after every method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import machine

RUN_CONFIG = ("task='causal-lm' basis-dtype='float32' rank=32 init-samples=16 num-server-rounds=5 local-steps=10 batch-size=8 "
              "learning-rate=0.002 fraction-train=1.0 eval-max-samples=40 eval-generate-samples=40 test-fraction=0.2")
# Similar cost per round: Fed-SB r=32 uploads 7 x 32^2 = 7,168 numbers per decoder layer; FedIT r=1 uploads
# 1 x (m + n) summed over the 7 projections = 10,176 (SmolLM2: hidden 576, kv 192, MLP 1536): the nearest rank.
RANKS = {"fed-sb": 32, "fedit": 1}
SHOWN = 6  # generated answers kept per method, before and after


def peft_check(run_dir: Path, task) -> dict:
    """Load the base model and ``adapter/peft`` with plain transformers + peft, generate greedily for the
    server's held-out problems, score with the task's scorer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(task.model_path)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter" / "peft")).eval()
    recs = task.generation_records()
    replies = task.generate(model, recs)
    return {"exact_match": task.score(recs, replies), "replies": replies}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["fed-sb", "fedit"])
    p.add_argument("--num-supernodes", type=int, default=4)
    p.add_argument("--run-config", default=RUN_CONFIG)
    p.add_argument("--rank", nargs="*", default=[], help="METHOD=RANK overrides, e.g. fedit=8")
    p.add_argument("--lr", nargs="*", default=[], help="METHOD=LR overrides, e.g. fedit=0.001")
    p.add_argument("--tag", default="", help="row name suffix, to keep several settings of one method")
    p.add_argument("--runs", default="runs/llm")
    p.add_argument("--out", default="bench/results/llm.json")
    args = p.parse_args()
    from fedsb.config import FedSBConfig
    from fedsb.tasks import get_task
    from server.simulation import parse_run_config, simulate

    path = Path(args.out)
    out = json.loads(path.read_text()) if path.exists() else {"what": "SmolLM2-135M-Instruct on reasoning-gym digit_sum",
                                                               "rows": []}
    ranks = {**RANKS, **{k: int(v) for k, v in (x.split("=") for x in args.rank)}}
    lrs = {k: float(v) for k, v in (x.split("=") for x in args.lr)}
    for method in args.methods:
        name = f"{method}-{args.tag}" if args.tag else method
        if any(r["method"] == name for r in out["rows"]):
            continue
        keys = dict(parse_run_config(args.run_config), method=method, rank=ranks.get(method, 32),
                    **{"output-dir": str((Path(args.runs) / name).resolve())})
        if method in lrs:
            keys["learning-rate"] = lrs[method]
        t0 = time.time()
        run = simulate(keys, args.num_supernodes)
        wall = time.time() - t0
        s = json.loads((run / "summary.json").read_text())
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        task = get_task(FedSBConfig.from_run_config({k: v for k, v in keys.items() if k != "output-dir"}))
        gen = task.generation_records()
        from fedsb.tasks.models import load_base_model

        before = task.generate(load_base_model(task.model_path, "causal-lm", 0, 0), gen[:SHOWN])
        check = peft_check(run, task)
        out["rows"].append({
            "method": name, "rank": keys["rank"], "learning_rate": keys.get("learning-rate"),
            "wall_seconds": round(wall, 1),
            "command": f"python -m bench.llm --methods {method} --num-supernodes {args.num_supernodes} "
                       + (f"--rank {' '.join(args.rank)} " if args.rank else "") + (f"--lr {' '.join(args.lr)} " if args.lr else "")
                       + (f"--tag {args.tag} " if args.tag else "") + f"--run-config \"{args.run_config}\"",
            "evaluate": [{k: r.get(k) for k in ("round", "loss", "perplexity", "exact_match")} for r in recs
                         if r["phase"] == "evaluate"],
            "summary": {k: s.get(k) for k in ("initial_exact_match", "final_exact_match", "initial_loss", "final_loss",
                                               "bytes_up_per_client_round", "bytes_one_time_per_client",
                                               "trainable_params", "communicated_params", "seconds")},
            "peft_exact_match": check["exact_match"], "generated": len(gen),
            "examples": [{"prompt": r.prompt, "answer": r.answer, "before": b, "after": a}
                         for r, b, a in zip(gen[:SHOWN], before, check["replies"][:SHOWN])]})
        out["machine"] = machine()
        path.write_text(json.dumps(out, indent=1))
    print(json.dumps([{k: r[k] for k in ("method", "wall_seconds", "peft_exact_match")} | r["summary"]
                      for r in out["rows"]], indent=1))


if __name__ == "__main__":
    main()
