"""The ``fedsb`` command: what is not a plain ``flwr run`` (simulate in-process, compare, certs, checks).

It lives beside the ServerApp because its commands drive federations; ``fedsb/`` (the library) never
imports it. Flower is imported inside the commands that need it, so ``fedsb certs`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("fedsb")

DESCRIPTION = """Federated fine-tuning of transformers with Fed-SB on Flower.

Run a federation in this process (simulate), compare fine-tuning methods on the same data (compare),
check a run configuration before starting it (check-config) or a run directory after it (check-run),
and set up a real deployment (certs, compose, local-superlink, warm-clientapp). `flwr run .` runs the
same apps through a SuperLink. Every run-config key, its default and its meaning is in README.md
("Configuration keys"); `fedsb COMMAND --help` shows a command's options."""

EPILOG = """examples:
  fedsb simulate --num-supernodes 4 --run-config "num-server-rounds=3 rank=16"
  fedsb check-config --num-supernodes 10 --run-config "rank=64 output-dir='/abs/run'"
  fedsb check-run runs/fed-sb-20260101-120000"""


def _cmd_check_config(args: argparse.Namespace) -> int:
    """The pre-flight check alone: what ``make run`` calls before ``flwr run`` (which cannot fail on it)."""
    from fedsb.config import FedSBConfig
    from fedsb.preflight import preflight
    from server.simulation import parse_run_config

    cfg = FedSBConfig.from_run_config(parse_run_config(args.run_config))
    preflight(cfg, args.num_supernodes)
    print(f"run config ok: task={cfg.task} method={cfg.method} rank={cfg.rank} model={cfg.model} dataset={cfg.dataset}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from server.simulation import parse_run_config, simulate

    run_dir = simulate(parse_run_config(args.run_config), args.num_supernodes, cpus_per_client=args.cpus_per_client,
                       gpus_per_client=args.gpus_per_client, verbose=args.verbose)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps({k: summary.get(k) for k in ("method", "final_accuracy", "final_loss", "bytes_up_per_client_round", "run_dir")}, indent=2))
    return 0


def parse_method_configs(pairs: list[list[str]]) -> dict[str, dict]:
    """``--method-config METHOD "k=v ..."``, repeated: {method: its run-config keys}."""
    from server.simulation import parse_run_config

    out: dict[str, dict] = {}
    for method, text in pairs:
        if method in out:
            raise ValueError(f"--method-config: {method!r} is given twice; put all its keys in one \"k=v k2=v\"")
        try:
            out[method] = parse_run_config(text)
        except ValueError as e:
            raise ValueError(f"--method-config {method}: {e}") from None
    return out


def _cmd_compare(args: argparse.Namespace) -> int:
    from lab.compare import Comparison, parse_lrs, parse_ranks
    from server.simulation import parse_run_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = Comparison(methods, args.num_supernodes, Path(args.out), parse_run_config(args.run_config),
                      parse_ranks(args.rank, methods), parse_lrs(args.lr, methods), seeds=args.seeds,
                      validation_fraction=args.validation_fraction, select_rounds=args.select_rounds,
                      max_extend=args.max_extend, backend=args.backend, server_app=args.server_app,
                      method_overrides=parse_method_configs(args.method_config)).run()
    print((Path(args.out) / "compare.md").read_text())
    return 0 if rows else 1


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedsb.ops.certs import make_certificates

    out = Path(args.out)
    if args.keep_existing and (out / "ca.crt").exists():
        print(f"{out} already holds certificates; keeping them")
        return 0
    files = make_certificates(out, args.nodes, hostnames=[*(args.host or ["superlink"]), "localhost"], ips=args.ip,
                              overwrite=args.overwrite, keep_ca_key=not args.no_ca_key)
    if args.by_party:
        from fedsb.ops.certs import split_by_party

        files.update(split_by_party(out, args.nodes, owner=args.owner))
    print("\n".join(str(p) for p in files.values() if p.exists()))
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    from fedsb.ops.deploy import write_compose

    for p in write_compose(args.out, args.nodes):
        print(p)
    return 0


def _cmd_check_run(args: argparse.Namespace) -> int:
    """Exit non-zero unless a run directory holds a complete run (``flwr run --stream`` exits 0 on failure)."""
    run_dir = Path(args.run_dir)
    summary = run_dir / "summary.json"
    if not summary.is_file():
        print(f"FAILED: {run_dir} has no summary.json: the run did not complete (see the log above)", file=sys.stderr)
        return 1
    s = json.loads(summary.read_text())
    print(f"run complete: {s['method']}, {s['rounds']} rounds, held-out accuracy {s.get('final_accuracy')} "
          f"(majority class {s.get('majority_rate')}), upload/client/round {s.get('bytes_up_per_client_round')} B; {run_dir}")
    return 0


def _cmd_local_superlink(args: argparse.Namespace) -> int:
    from server import local_superlink

    if args.action == "running":
        return 0 if local_superlink.local_superlinks() else 1
    n = local_superlink.stop()
    print(f"stopped the local SuperLink of {local_superlink.flwr_home()} ({n} process(es))" if n else
          f"no local SuperLink of {local_superlink.flwr_home()} was running")
    return 0


def _compare_defaults(argv: list[str]) -> dict[str, str]:
    """The rank and learning rate compare uses where --rank/--lr say nothing: fedsb's own defaults (compare
    sets both keys itself and refuses them in --run-config). Read from FedSBConfig, which imports torch, so
    only when the compare command is asked for."""
    if argv[:1] != ["compare"]:
        return {"rank": "fedsb's default rank", "lr": "fedsb's default learning-rate"}
    from fedsb.config import FedSBConfig

    return {"rank": f"{FedSBConfig.rank}, fedsb's default rank", "lr": f"{FedSBConfig.learning_rate:g}, fedsb's default learning-rate"}


def main(argv: list[str] | None = None) -> int:
    from fedsb.logs import configure as configure_logging
    argv = sys.argv[1:] if argv is None else argv
    defaults = _compare_defaults(argv)

    configure_logging()
    p = argparse.ArgumentParser(prog="fedsb", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:  # every subcommand's --help shows the defaults
        return sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    s = command("simulate", help="run the ServerApp/ClientApp in an in-process Flower simulation")
    s.add_argument("--num-supernodes", type=int, default=10, help="simulated nodes (clients)")
    s.add_argument("--run-config", default="", help='same syntax and keys as flwr run: "rank=64 method=\'fed-sb\'"')
    s.add_argument("--cpus-per-client", type=float, default=1.0, help="CPU cores reserved for each simulated client")
    s.add_argument("--gpus-per-client", type=float, default=0.0, help="a fraction shares a GPU, e.g. 0.25: 4 clients per GPU")
    s.add_argument("--verbose", action="store_true", help="Flower's DEBUG log too")
    s.set_defaults(func=_cmd_simulate)

    m = command("compare", help="run several methods on identical partitions, seeds and rounds")
    m.add_argument("--methods", default="fed-sb,fedit,ffa-lora,fedex-lora,flora", help="comma-separated methods")
    m.add_argument("--num-supernodes", type=int, default=10, help="simulated nodes (clients) of every run")
    m.add_argument("--out", required=True, help="directory for compare.csv, compare.md, pareto.png, curves.png")
    m.add_argument("--run-config", default="", help="overrides shared by every method")
    m.add_argument("--method-config", nargs=2, action="append", default=[], metavar=("METHOD", "CONFIG"),
                   help="run-config keys for one method only, on top of --run-config (repeatable): --method-config "
                   "fed-sb \"init-basis='weights' upload-dtype='int8' download-dtype='int8'\"")
    m.add_argument("--rank", default="", help="per-method ranks, several with |: 'fed-sb=16|32|64,fedit=4|8' "
                   # (%(default)s is '' here: it only stops the formatter from appending "(default: )")
                   f"(default%(default)s for a method not named: {defaults['rank']}; rank in --run-config is refused)")
    m.add_argument("--lr", default="", help="per-method learning rates; several are a grid chosen on the validation "
                   "split per method and rank: 'fed-sb=2.5e-3|5e-3|1e-2' (default%(default)s for a method not named: "
                   f"{defaults['lr']}; learning-rate in --run-config is refused)")
    m.add_argument("--seeds", type=int, default=1, help="final runs per (method, rank): seeds s, s+1, ... (s: run "
                   "config's seed)")
    m.add_argument("--validation-fraction", type=float, default=0.1, help="training data set aside (seeded, before "
                   "partitioning) to choose learning rates on, in every run of the comparison alike")
    m.add_argument("--select-rounds", type=int, default=0, help="rounds of a selection run (0: as many as the final runs)")
    m.add_argument("--max-extend", type=int, default=2, help="times the lr grid is extended by 2x when the best "
                   "rate is at its edge")
    m.add_argument("--backend", default="ray", choices=("ray", "inprocess"), help="ray: Flower's simulation, clients "
                   "in parallel; inprocess: the same apps, clients one after another in this process, no Ray (several "
                   "compare commands can then share a machine)")
    m.add_argument("--server-app", default="", help="module:attr of another ServerApp to run instead of fedsb's (e.g. "
                   "bench.compose:user_dp, FedSB wrapped in Flower's DP wrapper); several joined by | are chosen among on validation "
                   "like the rate (e.g. a server optimizer's step sizes)")
    m.set_defaults(func=_cmd_compare)

    cc = command("check-config", help="check a run config (files, columns, model, target modules, output-dir) "
                 "without starting anything; make run calls it before flwr run")
    cc.add_argument("--run-config", default="", help="the overrides you give flwr run --run-config")
    cc.add_argument("--num-supernodes", type=int, default=None, help="the nodes of the federation, if known "
                    "(checked against min-available-nodes)")
    cc.set_defaults(func=_cmd_check_config)

    k = command("certs", help="CA, SuperLink TLS certificate and SuperNode auth keys")
    k.add_argument("--out", default="certs", help="folder for the certificates and keys")
    k.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make")
    k.add_argument("--host", action="append", default=[], help="DNS name in the SuperLink certificate (repeatable; "
                   "none: superlink)")
    k.add_argument("--ip", action="append", default=["127.0.0.1"], help="IP in the SuperLink certificate (repeatable)")
    k.add_argument("--overwrite", action="store_true", help="replace existing certificates")
    k.add_argument("--keep-existing", action="store_true", help="do nothing if certificates exist")
    k.add_argument("--by-party", action="store_true", help="one folder per party (superlink/, supernode-i/, public/), "
                   "each with only that party's files, to mount into its container alone")
    k.add_argument("--owner", type=int, default=None, help="with --by-party: uid that owns the private keys (the "
                   "containers' user, 49999 in Flower's images)")
    k.add_argument("--no-ca-key", action="store_true", help="never write the CA key (nothing can sign another "
                   "certificate; for a single-host demo)")
    k.set_defaults(func=_cmd_certs)

    d = command("compose", help="(re)generate docker/compose.yml and compose.tls.yml from fedsb.ops.deploy")
    d.add_argument("--out", default="docker", help="folder for the compose files (created if missing)")
    d.add_argument("--nodes", type=int, default=3, help="SuperNodes in the federation")
    d.set_defaults(func=_cmd_compose)

    ls = command("local-superlink", help="the SuperLink `flwr run . local` leaves running: is it (exit 0), stop it")
    ls.add_argument("action", choices=["running", "stop"], help="`running`: exit 0 if it runs; `stop`: stop it")
    ls.set_defaults(func=_cmd_local_superlink)

    sub.add_parser("warm-clientapp", add_help=False,
                   help="a node's warm-start process: preloads torch and transformers and forks each ClientApp "
                        "process (`fedsb warm-clientapp --help`)")
    if argv[:1] == ["warm-clientapp"]:  # its own parser: every option after the subcommand is its
        from client.warm_start import main as warm_clientapp

        return warm_clientapp(argv[1:])

    c = command("check-run", help="fail unless RUN_DIR holds a completed run")
    c.add_argument("run_dir", help="the run's output-dir")
    c.set_defaults(func=_cmd_check_run)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as e:  # ConfigError and friends: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
