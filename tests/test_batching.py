"""The evaluation batch measured per model (`--batch-size auto`): which batch the ladder keeps, and
that an Evaluator, the CLI and sensitivity trials all run at the one it chose."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from models import hidden_batch_classifier
from prunec.cli.main import cli
from prunec.eval.data import EvalData
from prunec.eval.gate import Evaluator
from prunec.runtime.batching import CANDIDATES, fastest_batch


class CostModel:
    """A stand-in runtime with a clock: a run of b samples takes `ms(b) * b` milliseconds."""

    def __init__(self, ms, fails=lambda b: False):
        self.ms, self.fails, self.now, self.calls = ms, fails, 0.0, []

    def run(self, feed):
        b = len(feed["x"])
        self.calls.append(b)
        if self.fails(b):
            raise RuntimeError(f"cannot run batch {b}")
        self.now += self.ms(b) * b / 1e3

    def clock(self):
        return self.now


def inputs(n=100):
    return {"x": np.zeros((n, 3), np.float32)}


def test_keeps_the_least_time_per_sample():
    # Per-sample cost falls with the batch (fewer calls) until 8, then rises (caches overflow).
    rt = CostModel(lambda b: {1: 9.0, 2: 6.0, 4: 4.0, 8: 3.0, 16: 5.0, 32: 8.0, 64: 9.0}[b])
    choice = fastest_batch(rt.run, inputs(), clock=rt.clock)
    assert choice.batch == 8
    assert choice.ms_per_sample[8] == pytest.approx(3.0)
    assert "batch 8" in choice.describe() and "16: 5" in choice.describe()


def test_stops_once_two_batches_in_a_row_are_clearly_slower():
    rt = CostModel(lambda b: {1: 2.0, 2: 1.0, 4: 1.5, 8: 1.6}.get(b, 9.0))
    choice = fastest_batch(rt.run, inputs(), clock=rt.clock)
    assert choice.batch == 2
    assert max(rt.calls) == 8  # 4 and 8 were both > 1.3x slower than 2: 16, 32, 64 never ran


def test_a_batch_timed_over_several_runs_counts_them_all():
    # Batch 2 runs several times per timing (at least SPAN samples): its per-sample time must be
    # the total over all those runs, not one run's time spread over SPAN samples.
    rt = CostModel(lambda b: {1: 3.0, 2: 1.0, 4: 2.0}.get(b, 5.0))
    choice = fastest_batch(rt.run, inputs(), clock=rt.clock)
    assert choice.batch == 2 and choice.ms_per_sample[2] == pytest.approx(1.0)
    assert rt.calls.count(2) > 3


def test_skips_batches_the_model_cannot_run_and_never_exceeds_the_samples():
    rt = CostModel(lambda b: 1.0 / b, fails=lambda b: b > 4)
    choice = fastest_batch(rt.run, inputs(), clock=rt.clock)
    assert choice.batch == 4 and set(choice.ms_per_sample) == {1, 2, 4}
    rt = CostModel(lambda b: 1.0 / b)
    assert fastest_batch(rt.run, inputs(5), clock=rt.clock).batch == 4
    assert max(rt.calls) <= 5


def test_nothing_runs_falls_back_unmeasured():
    rt = CostModel(lambda b: 1.0, fails=lambda b: True)
    choice = fastest_batch(rt.run, inputs(), clock=rt.clock, fallback=64)
    assert choice.batch == 64 and not choice.ms_per_sample and "none" in choice.reason
    assert fastest_batch(rt.run, inputs(0), clock=rt.clock).reason == "no samples to measure on"


# ---------------------------------------------------------------- real sessions

def batch_one_only() -> onnx.ModelProto:
    """Runs on one sample at a time only."""
    return hidden_batch_classifier("x", [4], 1)


def test_auto_batch_runs_a_model_the_default_batch_cannot():
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    data = EvalData({"x": x}, labels=x.argmax(1))
    ev = Evaluator(batch_one_only(), data, batch_size="auto")
    assert ev.batch.batch == 1 and ev.run_kw["batch_size"] == 1
    assert ev.reference_value() == 100.0
    with pytest.raises(Exception, match="cannot run the model"):
        Evaluator(batch_one_only(), data, batch_size=64)


def test_auto_batch_on_the_demo_matches_batch_64_and_is_reported(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    model = onnx.load(root / "models" / "demo_cnn.onnx")
    npz = np.load(root / "models" / "demo_digits_test.npz")
    data = EvalData({"image": npz["image"][:200]}, labels=npz["labels"][:200])
    auto = Evaluator(model, data, batch_size="auto")
    fixed = Evaluator(model, data, batch_size=64)
    assert auto.batch.batch in CANDIDATES and set(auto.batch.ms_per_sample) <= set(CANDIDATES)
    np.testing.assert_allclose(auto.reference["clean"]["logits"], fixed.reference["clean"]["logits"],
                               rtol=1e-4, atol=1e-5)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["sensitivity", str(root / "models" / "demo_cnn.onnx"), "--data",
                                 str(root / "models" / "demo_digits_test.npz"), "--ratios", "0.5",
                                 "--no-cache", "--corruptions", "none", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "evaluated at batch" in r.output
    doc = json.loads(out.read_text())
    assert doc["batch"]["batch"] in CANDIDATES and doc["batch"]["ms_per_sample"]


def test_masked_trials_run_at_the_chosen_batch():
    from pathlib import Path

    from prunec.eval.trials import MaskedRunner, TrialGraph

    root = Path(__file__).resolve().parents[1]
    model = onnx.load(root / "models" / "demo_cnn.onnx")
    npz = np.load(root / "models" / "demo_digits_test.npz")
    ev = Evaluator(model, EvalData({"image": npz["image"][:50]}, labels=npz["labels"][:50]), batch_size=8)
    runner = MaskedRunner(TrialGraph(model), ev)
    assert runner.batch == 8 and all(got <= 8 for _, got in runner._chunks("clean"))


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_bad_batch_size_is_a_usage_error(value):
    r = CliRunner().invoke(cli, ["sensitivity", "models/demo_cnn.onnx", "--data", "models/demo_digits_test.npz",
                                 "--batch-size", value])
    assert r.exit_code == 2 and "--batch-size" in r.output and "Traceback" not in r.output
