"""What CI logs and scripts see (issue 13): tables at full width when piped, plain progress lines,
--json PATH on every command, exit codes in --help, corrupt names, and the README's own truths."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import helper

from models import DEMO_TEST, REPO, init, make_model, vi
from prunec.report.console import ProgressLines

LONG = "backbone/stage4/" + "very_long_block_name_" * 6 + "conv"  # 148 characters


@pytest.fixture(scope="module")
def long_names(tmp_path_factory):
    """A tiny image classifier whose conv has a 148-character name, and data for it."""
    d = tmp_path_factory.mktemp("long")
    r = np.random.default_rng(0)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name=LONG, pads=[1, 1, 1, 1]),
                    helper.make_node("Relu", ["c"], ["r"], name="relu"),
                    helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
                    helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
                    helper.make_node("Gemm", ["f", "g"], ["y"], name="fc")],
                   [vi("x", ["N", 1, 8, 8])], [vi("y", ["N", 3])],
                   [init("w", r.standard_normal((16, 1, 3, 3)).astype(np.float32)),
                    init("g", r.standard_normal((16, 3)).astype(np.float32))])
    onnx.save(m, str(d / "m.onnx"))
    np.savez(d / "d.npz", x=r.standard_normal((60, 1, 8, 8)).astype(np.float32))
    return d


def test_piped_tables_keep_long_names_whole(prunec_cli, long_names, tmp_path):
    """CliRunner's stdout is not a terminal: no table may cut or wrap a 148-character name."""
    m, d = long_names / "m.onnx", long_names / "d.npz"
    res = prunec_cli("run", m, "--passes", "channels", "-O", "channels.round=1", "-o", tmp_path / "o.onnx",
                     "--no-profile")
    assert res.exit_code == 0, res.output
    outputs = [prunec_cli("inspect", m).stdout,
               prunec_cli("sensitivity", m, "--data", d, "--ratios", "0.5", "--no-cache").stdout,
               prunec_cli("diff", m, tmp_path / "o.onnx").stdout]
    for text in outputs:
        assert any(LONG in line for line in text.splitlines()), text
        assert "…" not in text.replace("… ", "")  # rich's ellipsis for a cut cell


def test_progress_lines_on_long_commands(prunec_cli, demo_path, tmp_path, monkeypatch):
    """Piped stderr gets plain lines (here one per update: PRUNEC_PROGRESS_SECONDS=0)."""
    monkeypatch.setenv("PRUNEC_PROGRESS_SECONDS", "0")
    runs = {
        "sensitivity": ["sensitivity", demo_path, "--data", DEMO_TEST, "--ratios", "0.5", "--no-cache"],
        "potential": ["potential", demo_path, "--data", DEMO_TEST, "--ratios", "0.2", "--corruptions", "contrast"],
        "profile": ["profile", demo_path, "--seconds", "0.5", "--sessions", "1", "--no-ops", "--no-memory"],
        "run": ["run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", "--data", DEMO_TEST,
                "--corruptions", "contrast", "--no-profile"],
        "check": ["check", demo_path, demo_path, "--data", DEMO_TEST, "--corruptions", "contrast"],
    }
    for what, args in runs.items():
        res = prunec_cli(*args)
        assert res.exit_code == 0, (what, res.output)
        lines = [line for line in res.stderr.splitlines() if line.startswith(f"{what}: ")]
        assert len(lines) >= 2, (what, res.stderr)
        assert "\x1b" not in res.stderr and "\r" not in res.stderr  # no bar, no colour codes
    assert any(re.match(r"sensitivity: \d+/8 \(\d+%\), 0:\d\d elapsed", line) for line in
               prunec_cli(*runs["sensitivity"]).stderr.splitlines())


def test_progress_heartbeat_when_a_step_takes_long():
    buf = io.StringIO()
    with ProgressLines("sensitivity", interval=0.05, stream=buf) as p:
        p(1, 10, "group a")
        time.sleep(0.3)  # one slow step: no update for 6 intervals
    text = buf.getvalue()
    assert "sensitivity: still working: 1/10 (10%), 0:00 elapsed, ~0:0" in text, text
    quiet = io.StringIO()
    with ProgressLines("run", interval=60, stream=quiet) as p:
        for k in range(5):
            p(k + 1, 5, "pass")
    assert quiet.getvalue() == ""  # a quick command prints no progress


def test_json_path_means_the_same_on_every_command(prunec_cli, demo_path, tmp_path):
    cases = {
        "inspect": ["inspect", demo_path],
        "passes": ["passes"],
        "run": ["run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", "--no-profile"],
        "diff": ["diff", demo_path, demo_path],
        "check": ["check", demo_path, demo_path, "--data", DEMO_TEST, "--corruptions", "none"],
        "profile": ["profile", demo_path, "--runs", "3", "--no-ops", "--no-memory"],
        "sensitivity": ["sensitivity", demo_path, "--data", DEMO_TEST, "--ratios", "0.5", "--no-cache"],
        "potential": ["potential", demo_path, "--data", DEMO_TEST, "--ratios", "0.2", "--corruptions", "none"],
    }
    for name, args in cases.items():
        path = tmp_path / f"{name}.json"
        res = prunec_cli(*args, "--json", path)
        assert res.exit_code == 0, (name, res.output)
        assert isinstance(json.loads(path.read_text()), dict), name
    assert json.loads((tmp_path / "run.json").read_text())["written"] is True  # --json is --report
    assert {p["name"] for p in json.loads((tmp_path / "passes.json").read_text())["passes"]} >= {"channels"}
    for args in (["inspect", demo_path, "--json", "-"], ["inspect", demo_path, "--json"], ["passes", "--json"]):
        res = prunec_cli(*args)
        assert res.exit_code == 0 and isinstance(json.loads(res.stdout), dict), args


def test_exit_codes_are_in_the_help(prunec_cli):
    res = prunec_cli("--help")
    assert res.exit_code == 0
    help_text = res.stdout[res.stdout.index("Exit codes:"):]
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "129, 130, 143"):
        assert f"  {code}" in help_text, code


def test_invalid_utf8_names_are_one_line(prunec_cli, demo_model, tmp_path):
    m = onnx.ModelProto()
    m.CopyFrom(demo_model)
    next(n for n in m.graph.node if n.op_type == "Conv").name = "QQQQQQQQ"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(m.SerializeToString().replace(b"QQQQQQQQ", b"QQ\xff\xfeQQQQ"))
    for args in (["inspect", bad], ["run", bad, "--passes", "channels", "-o", tmp_path / "o.onnx"],
                 ["diff", bad, bad]):
        res = prunec_cli(*args)
        assert res.exit_code == 2, res.output
        assert "name is not valid UTF-8" in prunec_cli.one_line_error(res)
    assert not (tmp_path / "o.onnx").exists()


README = (REPO / "README.md").read_text()


def test_readme_python_snippet_runs_and_prints_the_group_table(tmp_path):
    code = next(b for b in re.findall(r"```python\n(.*?)```", README, re.DOTALL) if "PassManager" in b)
    shutil.copy(REPO / "models" / "demo_cnn.onnx", tmp_path / "model.onnx")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert all(not line.strip().isdigit() for line in lines), res.stdout  # a table, not a count
    assert any(line.startswith("/stem/stem.0/Conv 16 ") for line in lines), res.stdout
    assert (tmp_path / "pruned.onnx").is_file()


def test_readme_demo_numbers(demo_path, demo_model, demo_data):
    """The demo paragraph's parameter count, MACs, size and accuracy are the bundled model's."""
    from models import run
    from prunec.graph.costs import analyze_costs

    costs = analyze_costs(demo_model)
    sizes = {t.name: int(np.prod(t.dims)) for t in demo_model.graph.initializer}
    # torch's parameter count (what make_demo.py prints): BatchNormalization's running mean and
    # variance are buffers, and parameters the exporter merged are fed twice through Identity.
    stats = sum(sizes[n.input[k]] for n in demo_model.graph.node if n.op_type == "BatchNormalization"
                for k in (3, 4))
    shared = sum(sizes.get(n.input[0], 0) for n in demo_model.graph.node if n.op_type == "Identity")
    acc = (run(demo_model, {"image": demo_data["image"]})["logits"].argmax(1) == demo_data["labels"])
    assert f"{(sum(sizes.values()) - stats + shared) / 1000:.1f}k parameters" in README
    assert f"{costs.macs / 1e6:.2f}M MACs" in README
    assert f"{round(demo_path.stat().st_size / 1024)} KiB" in README
    assert f"**Test accuracy: {100 * acc.mean():.2f}%** ({acc.sum()}/{acc.size})" in README
