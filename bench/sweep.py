"""Several parts of ``bench.frontier`` at once, on a machine with more cores than one comparison uses.

    python -m bench.sweep --parts long-nonprivate,long-private-eps1 --jobs 14 [--arms fed-sb,fedit] [--archive runs.tgz]

Each (arm, rank) of each part is one ``fedsb compare`` command (``bench.frontier.command`` with that rank
alone and ``--backend inprocess``: clients one after another in the compare's own process, no Ray), and up
to ``--jobs`` of them run at once as separate processes with one thread each. A command is exactly what
``python -m bench.frontier --part P`` would run for that rank; finished runs are kept, so a sweep resumes.
When a command ends, its part is merged into bench/results/frontier-<part>/ and, with ``--archive``, every
run's summary.json and metrics.jsonl, the merged results and the logs are written to one tar.gz (rewritten
as the sweep goes, so a sweep stopped at a time limit still leaves what finished).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.frontier import PARTS, RESULTS, command, merge

log = logging.getLogger("fedsb.sweep")
RUN = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"


def jobs_of(parts: list[str], extra: str = "", arms: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(part, log name, command) for each arm (of ``arms`` only, if given) and rank, in the parts' order."""
    out = []
    for part in parts:
        for arm, (_, ranks, *_rest) in PARTS[part]["arms"].items():
            if arms and arm not in arms:
                continue
            for rank in ranks.split("|"):
                out.append((part, f"{arm}-r{rank}", command(part, arm, extra, rank=rank, backend="inprocess")))
    return out


def archive(path: Path, parts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for part in parts:
            for pattern in ("*/*/*/summary.json", "*/*/*/metrics.jsonl", "*.log"):
                for f in sorted(Path(f"runs/frontier-{part}").glob(pattern)):
                    tar.add(f)
            if (RESULTS / f"frontier-{part}").is_dir():
                tar.add(RESULTS / f"frontier-{part}")
    tmp.replace(path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--parts", required=True, help=f"comma-separated parts of bench.frontier ({', '.join(PARTS)})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="commands at once")
    p.add_argument("--extra", default="", help="more run-config keys for every run")
    p.add_argument("--arms", default="", help="comma-separated arms to run (default: every arm of the parts)")
    p.add_argument("--archive", default="", help="tar.gz of the results, rewritten as commands finish")
    p.add_argument("--deadline", type=float, default=0, help="seconds after which running commands are stopped and "
                   "what finished is merged and archived (0: none); a later sweep resumes them")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise SystemExit(f"--parts: {bad} unknown; known: {', '.join(PARTS)}")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    pending, running, failed = jobs_of(parts, args.extra, arms), [], []
    if not pending:
        raise SystemExit(f"--arms: none of {list(arms)} is an arm of {', '.join(parts)}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FEDSB_CLIENT_THREADS="1")
    start = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            part, name, cmd = pending.pop(0)
            logfile = Path(f"runs/frontier-{part}/{name}.log")
            logfile.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([sys.executable, "-c", RUN, *shlex.split(cmd)[1:]], env=env,
                                    stdout=logfile.open("w"), stderr=subprocess.STDOUT)
            running.append((part, name, cmd, proc))
            log.info("started %s/%s", part, name)
        time.sleep(2)
        if args.deadline and time.time() - start > args.deadline:
            log.warning("deadline: stopping %d running commands, %d not started", len(running), len(pending))
            for *_, proc in running:
                proc.terminate()
            for *_, proc in running:
                proc.wait()
            failed += [cmd for _, _, cmd, _ in running] + [cmd for _, _, cmd in pending]
            running, pending = [], []
            break
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            part, name, cmd, proc = job
            log.info("%s %s/%s after %.0f s", "finished" if proc.returncode == 0 else "FAILED", part, name,
                     time.time() - start)
            if proc.returncode != 0:
                failed.append(cmd)
            try:  # a summary being written by a running command can be half there: the next merge has it
                merge(part, args.extra)
            except Exception as e:  # noqa: BLE001 - the sweep goes on; the final merge below must succeed
                log.warning("merge of %s deferred: %s", part, e)
            if args.archive:
                archive(Path(args.archive), parts)
    for part in parts:
        merge(part, args.extra)
    if args.archive:
        archive(Path(args.archive), parts)
    for cmd in failed:
        log.error("failed: %s", cmd)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
