"""What a new user meets: the commands' help, `fedsb compose` into a new folder, the log of a run (fedsb's
lines only: no alembic, no Flower DEBUG, no progress bars), the README's PEFT example run on a real export,
and a resumed run's seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server import cli
from tests.conftest import user_env

ROOT = Path(__file__).resolve().parents[1]


def test_subcommand_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert "(default: 10)" in out and "(default: 1.0)" in out, out


def test_compose_into_a_new_folder_builds_from_the_checkout(tmp_path):
    import yaml

    out = tmp_path / "new" / "compose"
    assert cli.main(["compose", "--out", str(out), "--nodes", "2"]) == 0
    build = yaml.safe_load((out / "compose.yml").read_text())["services"]["superexec-serverapp"]["build"]
    assert (out / build["context"] / build["dockerfile"]).resolve() == ROOT / "docker" / "Dockerfile"
    assert (out / "compose.tls.yml").is_file() and (out / ".env").is_file()


def test_fedsb_logs_without_turning_on_other_loggers():
    """The root logger stays unconfigured: alembic's INFO and Flower's DEBUG records are not printed."""
    code = ("import logging, sys; from server import cli; cli.main(['check-run', '/nonexistent']); "
            "logging.getLogger('alembic.runtime.migration').info('ALEMBIC-INFO'); "
            "logging.getLogger('flwr').debug('FLOWER-DEBUG'); logging.getLogger('fedsb.x').info('FEDSB-INFO')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300)
    assert "FEDSB-INFO" in p.stderr and "ALEMBIC-INFO" not in p.stderr and "FLOWER-DEBUG" not in p.stderr, p.stderr


@pytest.mark.parametrize("first_import", [
    "from fedsb.privacy.dp import make_accountant; make_accountant('rdp')",  # a DP client's first use of Opacus
    "from client.warm_start import preload; preload(('opacus',))",  # a deployed node's warm start
])
def test_a_private_client_prints_each_fedsb_line_once(first_import):
    """Opacus calls logging.basicConfig when imported; its root handler would print every fedsb line a second
    time in each DP client and in a deployed node whose warm start preloads Opacus."""
    code = (f"import logging; from fedsb.logs import configure; configure(); {first_import}; "
            "import opacus; logging.getLogger('fedsb.x').info('FEDSB-ONCE')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("FEDSB-ONCE") == 1, p.stderr


@pytest.fixture(scope="module")
def cli_run(ray_run):
    """`fedsb simulate` as a user runs it, its whole output captured (the suite's Ray run: tests/conftest.py)."""
    return ray_run


def test_a_run_logs_fedsb_lines_not_library_noise(cli_run):
    _, log = cli_run
    assert "run complete" in log
    for noise in ("alembic", " DEBUG ", "DEBUG :", "FutureWarning", "Loading weights", "partition 0 round", "it/s]"):
        assert noise not in log, f"{noise!r} in the log:\n{log[-4000:]}"


def test_the_peft_example_loads_the_export_with_its_labels(cli_run, tiny_bert):
    run, _ = cli_run
    peft_dir = run / "adapter" / "peft"
    assert json.loads((peft_dir / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_bert.resolve())
    texts = ["good great excellent happy the movie", "bad awful terrible sad the movie"]
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "load_adapter.py"), str(run), *texts], cwd=run,
                       env=user_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == texts and all(line.split("\t")[0] in ("neg", "pos") for line in lines)


def test_the_bundled_model_travels_by_name(tmp_path):
    from fedsb.config import FedSBConfig
    from fedsb.tasks import SeqClsTask, base_model_path

    name = SeqClsTask(FedSBConfig(), "/somewhere/in/site-packages", None, []).portable_model_name
    assert name == "fedsb:default/seq-cls" and base_model_path(name) == SeqClsTask.default_model()
    assert SeqClsTask(FedSBConfig(model=str(tmp_path)), str(tmp_path), None, []).portable_model_name == str(tmp_path)


def test_resuming_a_finished_run_keeps_its_earlier_seconds(cli_run, tmp_path):
    import shutil

    from lab.inprocess_grid import run_inprocess  # the resume's seconds are the server's, not Ray's

    run = shutil.copytree(cli_run[0], tmp_path / "run")  # the Ray run is shared: resume a copy of it
    first = json.loads((run / "summary.json").read_text())
    cfg = dict(first["config"], **{"output-dir": str(run), "resume": True, "num-server-rounds": first["rounds"] + 1})
    run_inprocess(cfg, 3)
    s = json.loads((run / "summary.json").read_text())
    earlier = s["seconds"] - s["seconds_this_session"]
    assert s["rounds"] == first["rounds"] + 1
    assert 0 < earlier <= first["seconds"] + 0.01, (first["seconds"], s["seconds"], s["seconds_this_session"])


def test_readme_shows_the_load_adapter_example_verbatim():
    import re

    block = re.search(r"<!-- example:load_adapter -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block and block.group(1) == (ROOT / "examples" / "load_adapter.py").read_text()


def test_readme_lists_every_architecture_target_modules_auto_covers():
    import re

    from fedsb.adapters.inject import DEFAULT_TARGETS

    text = " ".join((ROOT / "README.md").read_text().split())
    sentence = re.search(r"`target-modules=auto` knows .*?: (.*?)\. ", text).group(1)
    assert sorted(re.findall(r"`([\w-]+)`", sentence)) == sorted(DEFAULT_TARGETS)
