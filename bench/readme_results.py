"""Render the README's results table from a run directory's summary.json (no number typed by hand).

    python -m bench.readme_results RUN_DIR "WALL_TIME_OF_MAKE_RUN"
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main() -> None:
    run_dir, wall = Path(sys.argv[1]), sys.argv[2]
    s = json.loads((run_dir / "summary.json").read_text())
    c = s["config"]
    table = "\n".join([
        f"`make run` on this 2-core CPU machine (10 simulated clients, {c['fraction-train']:.0%} sampled per round, "
        f"{s['rounds']} rounds of {c['local-steps']} local steps, rank {c['rank']}, all {s['adapted_layers']} linear layers "
        f"of MiniLM's blocks adapted); wall time of the whole `make run` with dependencies installed: {wall}. "
        f"Rendered from that run's `summary.json` by `python -m bench.readme_results <run-dir> <wall time>`.",
        "",
        "| metric | value |", "|---|---|",
        f"| held-out accuracy after {s['rounds']} rounds | **{s['final_accuracy']:.3f}** |",
        f"| held-out accuracy at initialization (round 0) | {s['initial_accuracy']:.3f} |",
        f"| majority-class rate of the held-out set | {s['majority_rate']:.3f} |",
        f"| held-out loss | {s['initial_loss']:.3f} → {s['final_loss']:.3f} |",
        f"| trainable = communicated parameters (R + head) | {s['trainable_params']:,} |",
        f"| measured upload per client per round | {s['bytes_up_per_client_round']:,.0f} B |",
        f"| floor r²·layers·4 B + head | {s['bytes_up_floor_per_client_round']:,} B "
        f"(measured/floor = {s['bytes_up_per_client_round'] / s['bytes_up_floor_per_client_round']:.4f}) |",
        f"| one-time basis broadcast, all nodes | {s['bytes_basis_total']:,} B |",
        f"| one-time init gradients, all nodes | {s['bytes_init_total']:,} B |",
        f"| server-side run time | {s['seconds']:.0f} s |",
    ])
    readme = Path("README.md").read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    block = f"{start}\n{table}\n{end}"
    readme = re.sub(re.escape(start) + ".*?" + re.escape(end), block, readme, flags=re.S) if start in readme \
        else readme.replace("RESULTS_TABLE", block)
    Path("README.md").write_text(readme)


if __name__ == "__main__":
    main()
