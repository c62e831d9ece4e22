"""--slice-max-drop names are checked before any model runs (issue 13 follow-up): a typo used to be
reported only after the original had run over clean data and every corruption.

The CLI tests use a model that cannot run on the data (its Reshape fixes the batch at 8): a name
checked before the run is an OptionError naming it; a name that gets past that check meets the
model's own DataError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models import DEMO, DEMO_TEST, files_in, hidden_batch_classifier
from prunec.eval.data import EvalData
from prunec.eval.gate import Evaluator
from prunec.eval.slice_names import expected_slice_names

CANNOT_RUN = "ONNX Runtime cannot run the model"


def broken_classifier() -> onnx.ModelProto:
    """(N,1,2,2) image -> 4 logits, declared for any N, but a Reshape to (8, 4) fails unless N is 8."""
    return hidden_batch_classifier("image", [1, 2, 2], 8)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """broken.onnx; labelled.npz (400 samples, classes 0..3 balanced, user column site=a|b) and
    unlabelled.npz (the same images only)."""
    d = tmp_path_factory.mktemp("slice_names")
    onnx.save(broken_classifier(), d / "broken.onnx")
    x = np.random.default_rng(0).uniform(0, 1, size=(400, 1, 2, 2)).astype(np.float32)
    labels = np.repeat([0, 1, 2, 3], 100)
    np.savez(d / "labelled.npz", image=x, labels=labels, slice_site=np.where(np.arange(400) % 2, "a", "b"))
    np.savez(d / "unlabelled.npz", image=x, slice_site=np.where(np.arange(400) % 2, "a", "b"))
    return d


def check(prunec_cli, d, data: str, key: str):
    return prunec_cli("check", d / "broken.onnx", d / "broken.onnx", "--data", d / data,
                      "--corruptions", "gaussian_noise", "--severities", "1,3", "--batch-size", "64",
                      "--slice-max-drop", f"{key}=2")


LABELLED = "all, class=0, class=1, class=2, class=3, site=a, site=b, gaussian_noise@1, gaussian_noise@3"
UNLABELLED = "all, pred=0, pred=1, pred=2, pred=3, site=a, site=b, gaussian_noise@1, gaussian_noise@3"


@pytest.mark.parametrize("data,key,listed", [
    ("labelled.npz", "raer", LABELLED),
    ("labelled.npz", "class=4", LABELLED),            # labels hold classes 0..3
    ("labelled.npz", "pred=1", LABELLED),             # with labels, class slices are class=<label>
    ("labelled.npz", "gaussian_noise@2", LABELLED),   # severity 2 was not asked for
    ("labelled.npz", "contrast@*", LABELLED),         # a glob matching nothing
    ("unlabelled.npz", "raer", UNLABELLED),
    ("unlabelled.npz", "pred=4", UNLABELLED),         # the output has 4 classes: 0..3
    ("unlabelled.npz", "pred=03", UNLABELLED),        # slices are named pred=3
    ("unlabelled.npz", "class=1", UNLABELLED),        # no labels: class slices are pred=<prediction>
    ("unlabelled.npz", "site=c", UNLABELLED),
])
def test_an_unknown_name_is_reported_before_the_model_runs(prunec_cli, broken, data, key, listed):
    res = check(prunec_cli, broken, data, key)
    assert res.exit_code == 2
    err = prunec_cli.one_line_error(res)
    assert err == (f"prunec: error: --slice-max-drop {key}: no slice, slice kind or glob match by that "
                   f"name; slices: {listed}; kinds: all, class, rare, user, length, corruption")


@pytest.mark.parametrize("data,key", [
    ("labelled.npz", "all"), ("labelled.npz", "rare"), ("labelled.npz", "corruption"),
    ("labelled.npz", "length"), ("labelled.npz", "class=3"), ("labelled.npz", "class=*"),
    ("labelled.npz", "site=a"), ("labelled.npz", "gaussian_noise@3"), ("labelled.npz", "gaussian_noise@*"),
    ("unlabelled.npz", "pred=0"), ("unlabelled.npz", "pred=3"), ("unlabelled.npz", "pred=*"),
    ("unlabelled.npz", "ra*"), ("unlabelled.npz", "site=b"), ("unlabelled.npz", "gaussian_noise@1"),
])
def test_a_valid_name_gets_to_the_model(prunec_cli, broken, data, key):
    """Names the data, corruptions or output shape make valid pass the early check: the command
    goes on to run the model, which cannot run on this data."""
    res = check(prunec_cli, broken, data, key)
    assert res.exit_code == 2
    assert CANNOT_RUN in prunec_cli.one_line_error(res)


def test_run_reports_an_unknown_name_before_the_model_runs(prunec_cli, broken, tmp_path):
    res = prunec_cli("run", broken / "broken.onnx", "--passes", "cleanup", "-o", tmp_path / "o.onnx",
                     "--report", tmp_path / "r.json", "--data", broken / "unlabelled.npz",
                     "--batch-size", "64", "--slice-max-drop", "raer=2")
    assert res.exit_code == 2
    assert "--slice-max-drop raer: no slice" in prunec_cli.one_line_error(res)
    assert files_in(tmp_path) == set()


@pytest.fixture(scope="module")
def demo():
    with np.load(DEMO_TEST) as z:
        x, labels = z["image"][:200], z["labels"][:200]
    return onnx.load(str(DEMO)), x, labels


def test_foreseen_names_are_the_evaluators_names(demo):
    """With labels every name is known before the run, in the Evaluator's order."""
    model, x, labels = demo
    data = EvalData({"image": x}, labels, slices={"site": np.where(np.arange(len(x)) % 3, "a", "b")})
    kw = dict(corruptions=["gaussian_noise", "contrast"], severities=[2, 5])
    early = expected_slice_names(model, data, **kw)
    ev = Evaluator(model, data, **kw)
    assert early.open_prefix is None
    assert early.names == [s.name for s in ev.slices]


def test_prediction_slices_are_left_open_within_the_class_count(demo):
    """Without labels the class slices come from the predictions: every one the Evaluator makes
    is foreseen as possible, the rest of the names exactly."""
    model, x, _ = demo
    data = EvalData({"image": x})
    early = expected_slice_names(model, data, corruptions=["shot_noise"], severities=[3])
    late = [s.name for s in Evaluator(model, data, corruptions=["shot_noise"], severities=[3]).slices]
    assert early.open_prefix == "pred" and early.open_classes == 10
    assert [n for n in late if not n.startswith("pred=") and n != "rare"] == early.names
    assert all(early.could_name(n) for n in late)
    assert not early.could_name("pred=10") and not early.could_name("pred=-1")


def test_an_undeclared_class_count_leaves_any_class_id_open():
    """A float (N, T) output is a classifier over T classes, but T is symbolic: any pred=<id> (and
    any glob) waits for the run; other names are still checked; a length slice is foreseen."""
    tokens = np.zeros((40, 6), np.int64)
    for i in range(40):
        tokens[i, : 1 + i % 6] = 7
    x = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "T"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])
    m = helper.make_model(helper.make_graph([helper.make_node("Cast", ["tokens"], ["y"], to=TensorProto.FLOAT)],
                                            "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    data = EvalData({"tokens": tokens})
    early = expected_slice_names(m, data)
    assert early.open_prefix == "pred" and early.open_classes is None
    assert early.names == ["all", "short (len<=3)", "long (len>=4)"]
    assert early.could_name("pred=123") and early.could_name("p*d=1?")
    assert not early.could_name("raer") and not early.could_name("class=1")
    assert all(early.could_name(s.name) for s in Evaluator(m, data).slices)
