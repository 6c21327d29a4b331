"""Are two run directories the same run? Every metric, count, byte total and tensor, ignoring timings
and memory peaks.

    python -m lab.same_run RUN_A RUN_B      # exit 0 when identical up to timings, else lists what differs

Used to show that a refactor changed no behaviour: metrics.jsonl row by row, summary.json, the exported
adapters (fedsb format and PEFT) and the checkpoint's tensors, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# wall-clock fields, memory peaks (what the machine and the allocator did, not the run: a client's peak RSS
# differs between two runs of one commit), and the paths that name the run directory itself
IGNORED = {"seconds", "seconds_this_session", "client_seconds", "server_peak_bytes", "client_peak_memory_bytes",
           "run_dir", "output-dir"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in IGNORED}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'B' if k not in a else 'A'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def _tensors(path: Path, out: list[str], other: Path) -> None:
    ta, tb = load_file(str(path)), load_file(str(other))
    if sorted(ta) != sorted(tb):
        out.append(f"{path.name}: tensor names differ ({sorted(set(ta) ^ set(tb))[:5]})")
    for k in sorted(set(ta) & set(tb)):
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            out.append(f"{path.name}:{k}: tensors differ")


def compare(a: Path, b: Path) -> list[str]:
    out: list[str] = []
    rows = [[json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    if len(rows[0]) != len(rows[1]):
        out.append(f"metrics.jsonl: {len(rows[0])} rows != {len(rows[1])}")
    for i, (x, y) in enumerate(zip(*rows)):
        _diff(_strip(x), _strip(y), f"metrics.jsonl[{i}] ({x['phase']} {x['round']})", out)
    _diff(*(_strip(json.loads((d / "summary.json").read_text())) for d in (a, b)), "summary", out)
    for rel in ("adapter/fedsb_adapter.safetensors", "adapter/peft/adapter_model.safetensors", "checkpoint.safetensors"):
        if (a / rel).is_file() or (b / rel).is_file():
            _tensors(a / rel, out, b / rel)
    for rel in ("adapter/fedsb_adapter.json", "adapter/peft/adapter_config.json"):
        if (a / rel).is_file():
            _diff(*(_strip(json.loads((d / rel).read_text())) for d in (a, b)), rel, out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.same_run", description=__doc__.split("\n\n")[0],
                                     epilog="Each run directory comes from a run of its own tree, e.g. `fedsb simulate "
                                            "--run-config \"output-dir='/tmp/a'\"` on one commit and output-dir='/tmp/b' "
                                            "on the other (the config's seed makes them comparable).")
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    a, b = args.run_a, args.run_b
    for d in (a, b):
        if not (d / "metrics.jsonl").is_file() or not (d / "summary.json").is_file():
            parser.error(f"{d} is not a finished run directory (it lacks metrics.jsonl or summary.json)")
    diffs = compare(a, b)
    print("\n".join(diffs) if diffs else f"identical up to timings: {a} and {b}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
