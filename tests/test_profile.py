"""`prunec profile` and the profile step of `prunec run`: statistics, trace parsing, provider
errors, the JSON schema, and two timing directions (never absolute times)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from prunec.cli.main import cli
from prunec.errors import OptionError, ProviderError
from prunec.eval.profile import compare_models, profile_model
from prunec.runtime.latency import TimingPlan, median_ci, replicate_ci, speedup_ci, t_quantile
from prunec.runtime.opprofile import parse_trace
from prunec.runtime.session import make_session


def conv_chain(channels: int, layers: int, hw: int, seed: int = 0) -> onnx.ModelProto:
    """`layers` 1x1 convs (+ReLU) at `channels` wide: MACs = layers * channels^2 * hw^2 per item."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    dims = ["N", channels, hw, hw]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("profile") / "tiny.onnx"
    onnx.save(conv_chain(8, 2, 8), str(p))
    return p


@pytest.fixture(scope="session")
def heavy_pair():
    # 8 vs 4 identical 1x1 convs at 128 channels: exactly half the MACs, and at batch 8 each
    # conv is ~34M MACs, so compute (not per-run overhead) dominates.
    return conv_chain(128, 8, 16), conv_chain(128, 4, 16)


# --- statistics: oracles from the binomial table and exact ratios ----------------------------

def test_median_ci_matches_binomial_table():
    # Binomial(100, 1/2): P(B <= 39) = 0.0176 <= 0.025 < P(B <= 40) = 0.0284, so the 95%
    # interval is the 40th to the 61st order statistic (the textbook ranks for n = 100).
    assert median_ci(np.arange(1, 101), 0.95) == (40.0, 61.0)
    # n = 10: ranks 2 and 9 (coverage 97.9%).
    assert median_ci(np.arange(1, 11)[::-1], 0.95) == (2.0, 9.0)
    # n = 5 cannot reach 95% with order statistics: the full range is the best there is.
    assert median_ci([5, 1, 3, 2, 4], 0.95) == (1.0, 5.0)


def test_speedup_ci_exact_ratios():
    b = np.linspace(1.0, 2.0, 50)
    assert speedup_ci(2 * b, b) == pytest.approx((2.0, 2.0, 2.0))
    assert speedup_ci(b, b) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        speedup_ci(b, b[:-1])


def test_t_quantile_and_between_session_interval():
    # Student t table values (0.975 quantile).
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(t, rel=0.01)
    # Two sessions at exp(-0.01) and exp(+0.01): log sd = 0.01*sqrt(2), half width = t(1) * 0.01.
    lo, hi = replicate_ci(1.0, [np.exp(-0.01), np.exp(0.01)])
    assert (np.log(lo), np.log(hi)) == pytest.approx((-0.12706, 0.12706), rel=1e-3)
    assert replicate_ci(2.0, [1.5]) == (2.0, 2.0)


def test_timing_plan_splits_runs_over_sessions():
    assert [p.runs for p in TimingPlan(runs=22, seconds=None, sessions=4).split()] == [6, 6, 5, 5]
    assert [p.runs for p in TimingPlan(runs=8, seconds=None, sessions=4).split()] == [8]
    assert [p.seconds for p in TimingPlan(seconds=2.0, sessions=4).split()] == [0.5] * 4


def test_timing_plan_rejects_runs_and_seconds():
    with pytest.raises(OptionError, match="not both"):
        TimingPlan.of(runs=10, seconds=1.0)
    assert TimingPlan.of().seconds == 2.0 and TimingPlan.of(runs=3).seconds is None


def test_parse_trace_skips_warmup_and_takes_node_medians():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "provider": "CPUExecutionProvider"}}

    events = [run(0, 100), node("a", "Conv", 10, 90),  # warm-up: must be ignored
              run(200, 100), node("a", "Conv", 210, 40), node("b", "Relu", 260, 10),
              {"cat": "Node", "name": "a_fence_before", "ts": 205, "dur": 0},
              run(400, 100), node("a", "Conv", 410, 50), node("b", "Relu", 460, 20),
              run(600, 100), node("a", "Conv", 610, 60), node("b", "Relu", 660, 30),
              node("late", "Add", 900, 999)]  # after the last run: ignored
    prof = parse_trace(events, runs=3, batch=4, top=1)
    # medians over the three measured runs: a = 50 us, b = 20 us.
    assert prof.by_op_ms == pytest.approx({"Conv": 0.050, "Relu": 0.020})
    assert prof.total_ms == pytest.approx(0.070)
    assert prof.op_counts == {"Conv": 1, "Relu": 1}
    assert [n.name for n in prof.top_nodes] == ["a"] and prof.batch == 4
    with pytest.raises(ValueError):
        parse_trace(events, runs=5)


# --- provider errors ------------------------------------------------------------------------

def test_unavailable_provider_lists_available_ones(tiny_path):
    with pytest.raises(ProviderError, match="CPUExecutionProvider") as exc:
        profile_model(tiny_path, provider="cuda", runs=1)
    assert "'cuda' is not available" in str(exc.value)


def test_provider_that_fails_to_initialise_is_not_silently_replaced(tiny_path, monkeypatch):
    # Pretend this build lists CUDA: ORT then builds a CPU-only session with just a warning.
    import onnxruntime as ort

    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ProviderError, match="failed to initialise"):
            make_session(str(tiny_path), provider="cuda")


@pytest.mark.parametrize("argv", [["profile", "{m}", "--provider", "cuda", "--json", "{out}"],
                                  ["profile", "{m}", "--provider", "NoSuchExecutionProvider"],
                                  ["run", "{m}", "--passes", "cleanup", "-o", "{out}", "--provider", "cuda"]])
def test_cli_provider_error_is_one_line_and_writes_nothing(tiny_path, tmp_path, argv):
    out = tmp_path / "out.file"
    args = [a.format(m=tiny_path, out=out) for a in argv]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunec: error: execution provider")
    assert "available: " in lines[0] and "CPUExecutionProvider" in lines[0]
    assert not out.exists()


def test_cli_bad_model_or_report_path_fails_before_measuring(tiny_path, tmp_path):
    out = tmp_path / "out.json"
    res = CliRunner().invoke(cli, ["profile", str(tmp_path / "missing.onnx"), "--json", str(out)])
    assert res.exit_code == 2 and "no such file" in res.stderr and not out.exists()
    res = CliRunner().invoke(cli, ["profile", str(tiny_path), "--json", str(tmp_path / "nope" / "o.json")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = CliRunner().invoke(cli, ["profile", str(tiny_path), "--compare", str(tmp_path / "gone.onnx"),
                                   "--json", str(out)])
    assert res.exit_code == 2 and "gone.onnx" in res.stderr and not out.exists()


def test_input_shape_fixes_the_batch_label(tiny_path):
    rep = profile_model(tiny_path, batches=(1, 8), input_shapes={"x": (3, 8, 8, 8)}, runs=3,
                        ops=False, memory=False)
    # --input-shape fixes the batch at 3, so both requested batches collapse into one.
    assert [s.batch for s in rep.latency] == [3]
    assert rep.costs.macs == {3: 3 * 2 * 8 * 8 * 64}


def test_cli_rejects_bad_batch_and_runs_with_seconds(tiny_path):
    res = CliRunner().invoke(cli, ["profile", str(tiny_path), "--batch", "0"])
    assert res.exit_code == 2 and "positive" in res.output
    res = CliRunner().invoke(cli, ["profile", str(tiny_path), "--runs", "3", "--seconds", "1"])
    assert res.exit_code == 2 and "not both" in res.stderr


# --- JSON schema -----------------------------------------------------------------------------

LATENCY_KEYS = {"batch": int, "runs": int, "p50_ms": float, "p90_ms": float, "p99_ms": float,
                "mean_ms": float, "min_ms": float, "median_ci_ms": list, "confidence": float,
                "items_per_s": float, "sessions": int}


def _check_profile(d: dict, batches: list[int], *, ops: bool, memory: bool) -> None:
    assert set(d) == {"schema_version", "model", "provider", "threads", "runtime", "target", "machine",
                      "settings", "costs", "latency", "ops", "memory"}
    assert d["runtime"] == "ort" and d["target"]["key"] == "ort-cpu"
    assert d["schema_version"] == 1
    assert d["provider"] == "CPUExecutionProvider" and isinstance(d["model"], str)
    assert {"cpu", "logical_cpus", "onnxruntime", "threads", "date"} <= set(d["machine"])
    assert set(d["costs"]) == {"params", "macs", "weight_bytes", "file_bytes", "unknown_mac_layers"}
    assert list(d["costs"]["macs"]) == [str(b) for b in batches]
    assert [s["batch"] for s in d["latency"]] == batches
    for s in d["latency"]:
        assert set(s) == set(LATENCY_KEYS)
        for k, t in LATENCY_KEYS.items():
            assert isinstance(s[k], t), k
        lo, hi = s["median_ci_ms"]
        assert lo <= s["p50_ms"] <= hi and s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
    if ops:
        assert set(d["ops"]) == {"batch", "runs", "total_ms", "by_op_ms", "op_counts", "top_nodes", "source",
                                 "sparse_layers"}
        assert d["ops"]["by_op_ms"] and all(isinstance(v, float) for v in d["ops"]["by_op_ms"].values())
        assert {"name", "op_type", "provider", "ms", "kernel", "onnx_nodes"} == set(d["ops"]["top_nodes"][0])
    else:
        assert d["ops"] is None
    if memory:
        m = d["memory"]
        assert set(m) == {"batch", "baseline_rss_bytes", "peak_rss_bytes", "session_bytes", "cpu_arena"}
        assert m["peak_rss_bytes"] >= m["baseline_rss_bytes"] > 0
    else:
        assert d["memory"] is None


def test_cli_compare_json_schema_and_plot(tiny_path, tmp_path):
    other = tmp_path / "narrow.onnx"
    onnx.save(conv_chain(8, 1, 8, seed=1), str(other))
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    res = CliRunner().invoke(cli, ["profile", str(tiny_path), "--compare", str(other), "--batch", "1,2",
                                   "--runs", "8", "--warmup", "1", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "speedup" in res.stdout and "DONE" in res.stdout
    doc = json.loads(out.read_text())
    assert set(doc) == {"schema_version", "before", "after", "speedups"}
    _check_profile(doc["before"], [1, 2], ops=True, memory=True)
    _check_profile(doc["after"], [1, 2], ops=True, memory=True)
    # MACs from the one counter, checked by hand: 8x8x8x8 per layer per item, 2 layers vs 1.
    assert doc["before"]["costs"]["macs"] == {"1": 2 * 8 * 8 * 64, "2": 2 * 2 * 8 * 8 * 64}
    for sp in doc["speedups"]:
        assert set(sp) == {"batch", "speedup", "ci", "confidence", "pairs", "sessions", "theoretical",
                           "realized"}
        assert sp["pairs"] == 8 and sp["theoretical"] == pytest.approx(2.0)
        assert sp["realized"] == pytest.approx(sp["speedup"] / 2.0)
        assert sp["ci"][0] <= sp["speedup"] <= sp["ci"][1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_single_model_json(tiny_path, tmp_path):
    out = tmp_path / "single.json"
    res = CliRunner().invoke(cli, ["profile", str(tiny_path), "--runs", "5", "--warmup", "1",
                                   "--no-memory", "--no-ops", "--json", str(out), "--samples"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["latency"][0]["samples_ms"]) == 5
    doc["latency"][0].pop("samples_ms")
    _check_profile(doc, [1], ops=False, memory=False)


# --- memory ------------------------------------------------------------------------------------

def test_peak_memory_is_the_childs_own_and_grows_with_weights():
    from prunec.runtime.memory import peak_memory

    # The parent holds 256 MiB: a child reporting ru_maxrss would inherit that high-water mark.
    ballast = np.ones(256 * 2**20, dtype=np.uint8)
    tiny = peak_memory(conv_chain(8, 1, 8), {"x": ((1, 8, 8, 8), np.float32)})
    big = peak_memory(conv_chain(1024, 4, 4), {"x": ((1, 1024, 4, 4), np.float32)})  # 16 MiB of weights
    assert ballast[-1] == 1
    assert 0 < tiny.baseline_rss_bytes <= tiny.peak_rss_bytes < 200 * 2**20
    # ORT keeps at least one copy of the weights resident.
    assert big.session_bytes - tiny.session_bytes > 14 * 2**20


# --- timing directions (ratios from one interleaved run; no absolute times) ---------------------

def test_model_against_itself_has_speedup_interval_containing_one(heavy_pair):
    # A 95% interval misses the truth 1 time in 20 by design (seen once in ~45 tries here), so the
    # test asks for 99%; and the interval must still be informative, not made wide to pass.
    model = heavy_pair[1]
    rep = compare_models(model, model, batches=(1,), seconds=1.5, ops=False, memory=False,
                         confidence=0.99, n_boot=2000)
    sp = rep.speedups[0]
    assert sp.theoretical == pytest.approx(1.0)
    assert sp.ci[0] <= 1.0 <= sp.ci[1], sp
    assert sp.ci[1] / sp.ci[0] < 1.5, sp


def test_half_the_macs_runs_faster_at_batch_8(heavy_pair):
    big, small = heavy_pair
    rep = compare_models(big, small, batches=(8,), seconds=1.0, warmup=2, ops=False, memory=False)
    sp = rep.speedups[0]
    assert sp.theoretical == pytest.approx(2.0)  # 8 vs 4 identical layers, by construction
    # Direction only, with a generous margin (measured 1.7x to 1.9x here); the interval is not
    # asserted: one of 4 sessions hit by a burst of other load can widen it past 1.
    assert rep.after.at(8).p50_ms < rep.before.at(8).p50_ms
    assert sp.speedup > 1.2, sp


# --- `prunec run` integration -------------------------------------------------------------------

def test_run_profiles_by_default_and_skips_with_no_profile(tiny_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["run", str(tiny_path), "--passes", "cleanup", "-o", str(out),
                                   "--report", str(rep), "--batch", "1,2"])
    assert res.exit_code == 0, res.output
    assert "speedup" in res.stdout and "batch 2" in res.stdout
    doc = json.loads(rep.read_text())
    assert [s["batch"] for s in doc["profile"]["speedups"]] == [1, 2]
    assert doc["profile"]["before"]["model"] == str(tiny_path)
    res = CliRunner().invoke(cli, ["run", str(tiny_path), "--passes", "cleanup", "-o", str(out),
                                   "--report", str(rep), "--no-profile"])
    assert res.exit_code == 0, res.output
    assert "speedup" not in res.stdout and json.loads(rep.read_text())["profile"] is None


# --- rendering (result objects built by hand: reports render, they never measure) ------------------

def _fake(model: str, p50: float):
    from prunec.eval.profile import ModelCosts, ProfileReport
    from prunec.runtime.latency import LatencyStats

    return ProfileReport(model=model, provider="CPUExecutionProvider", threads=None,
                         machine={"cpu": "x", "logical_cpus": 2, "onnxruntime": "1", "date": "d"},
                         settings={"runs": 3, "seconds": None, "warmup": 0, "gap_ms": 1.0,
                                   "interleaved": True},
                         costs=ModelCosts(10, {1: 100}, 40, 50, 0),
                         latency=[LatencyStats.from_samples([p50, p50, p50], 1)])


def test_speedup_line_flags_a_slower_model_and_tables_render():
    from rich.console import Console

    from prunec.eval.profile import CompareReport
    from prunec.report.profile import render, speedup_line
    from prunec.runtime.latency import SpeedupStats

    slower = CompareReport(_fake("a.onnx", 1.0), _fake("b.onnx", 1.25),
                           [SpeedupStats(1, 0.8, (0.75, 0.85), 0.95, 3, theoretical=2.0)])
    line = speedup_line(slower)
    assert "0.80x [0.75, 0.85]" in line and "realized 40%" in line and "SLOWER" in line
    assert "prunec profile a.onnx --compare b.onnx" in line
    faster = CompareReport(_fake("a.onnx", 1.0), _fake("b.onnx", 0.5),
                           [SpeedupStats(1, 2.0, (0.9, 2.2), 0.95, 3, theoretical=2.0)])
    assert "SLOWER" not in speedup_line(faster)  # the interval reaches above 1: not shown slower
    console = Console(record=True, width=100)
    render(console, faster)
    text = console.export_text()
    assert "2.00x" in text and "0.90-2.20" in text and "100%" in text
