"""Task metrics (issue 13): --metric loads the user's scoring function; the two examples in
docs/metrics/ gate end to end: a CTC recognizer built here (labels as strings) and a segmenter."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from models import REPO, init, make_model, vi
from prunec.errors import DataError, OptionError
from prunec.eval.task_metric import load_metric

CTC = REPO / "docs" / "metrics" / "ctc_exact_match.py"
IOU = REPO / "docs" / "metrics" / "mask_iou.py"
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"  # the example's default charset
C = len(CHARS) + 1  # + the CTC blank, class 0
T = 16
HIDDEN = 64


def recognizer(scale_class: int | None = None, scale: float = 1.0) -> onnx.ModelProto:
    """x[N,37,T] per-step class evidence -> Conv1x1(64) -> Relu -> Conv1x1(37) -> y[N,T,37].

    The hidden layer is the identity on 37 channels plus 27 weak ones (|w| = 0.01): pruning the
    weak ones keeps every decoded word. `scale_class` weakens one class's output, so that the
    words holding that character decode wrong while the outputs stay close (high cosine)."""
    r = np.random.default_rng(0)
    w1 = np.concatenate([np.eye(C), 0.01 * r.standard_normal((HIDDEN - C, C))]).astype(np.float32)
    w2 = np.concatenate([np.eye(C), 0.01 * r.standard_normal((C, HIDDEN - C))], axis=1).astype(np.float32)
    if scale_class is not None:
        w2[scale_class] *= scale
    return make_model(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="hidden"), helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("Conv", ["a", "w2"], ["o"], name="head"),
         helper.make_node("Transpose", ["o"], ["y"], name="to_ntc", perm=[0, 2, 1])],
        [vi("x", ["N", C, T])], [vi("y", ["N", T, C])],
        [init("w1", w1[:, :, None]), init("w2", w2[:, :, None])])


def words_data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit strings of 2-5 characters, each character 2 steps then a blank, as noisy one-hot steps."""
    r = np.random.default_rng(seed)
    words = ["".join(r.choice(list("0123456789"), size=r.integers(2, 6))) for _ in range(n)]
    x = r.uniform(0, 0.4, size=(n, C, T)).astype(np.float32)
    for i, w in enumerate(words):
        steps = [k for ch in w for k in (CHARS.index(ch) + 1,) * 2 + (0,)]
        steps += [0] * (T - len(steps))
        x[i, steps, np.arange(T)] += 1.0
    return x, np.array(words)


@pytest.fixture(scope="module")
def ctc(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctc")
    onnx.save(recognizer(), str(d / "rec.onnx"))
    onnx.save(recognizer(scale_class=CHARS.index("7") + 1, scale=0.2), str(d / "bad.onnx"))
    x, words = words_data()
    np.savez(d / "words.npz", x=x, labels=words)  # labels as strings: the words
    np.savez(d / "x_only.npz", x=x)
    return d


def test_ctc_example_decodes_the_recognizer():
    from importlib import util

    spec = util.spec_from_file_location("ctc_example", CTC)
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, words = words_data(20)
    from models import run

    y = run(recognizer(), {"x": x})["y"]
    assert mod.decode(y) == list(words)
    assert mod.exact_match({"y": y}, words).tolist() == [1.0] * 20


def test_ctc_exact_match_gates_what_cosine_misses(prunec_cli, ctc, tmp_path):
    """A recognizer that misreads every '7': cosine calls it a small drop, exact match a big one."""
    metric = f"{CTC}:exact_match"
    res = prunec_cli("check", ctc / "rec.onnx", ctc / "bad.onnx", "--data", ctc / "x_only.npz",
                     "--max-drop", "5", "--json", tmp_path / "cos.json")
    cosine = json.loads((tmp_path / "cos.json").read_text())
    assert res.exit_code == 0 and cosine["metric"] == "cosine", res.output
    res = prunec_cli("check", ctc / "rec.onnx", ctc / "bad.onnx", "--data", ctc / "words.npz",
                     "--metric", metric, "--max-drop", "5", "--json", tmp_path / "em.json")
    assert res.exit_code == 3, res.output
    em = json.loads((tmp_path / "em.json").read_text())
    drop = {s["name"]: s["drop"]["value"] for s in em["slices"]}
    assert em["metric"] == "task:exact_match" and "exact_match %" in res.stdout
    sevens = 100 * sum("7" in w for w in np.load(ctc / "words.npz")["labels"]) / 200
    assert 25 < drop["all"] <= sevens  # words with a 7 (35% of them), and only those
    assert 5 > cosine["slices"][0]["drop"]["value"]
    lo, hi = em["slices"][0]["drop"]["lo"], em["slices"][0]["drop"]["hi"]
    assert lo < drop["all"] < hi  # per-sample scores give a paired bootstrap interval
    # Without --metric, words are no class ids: one line saying what to do.
    res = prunec_cli("check", ctc / "rec.onnx", ctc / "bad.onnx", "--data", ctc / "words.npz")
    assert res.exit_code == 2 and "--metric" in prunec_cli.one_line_error(res)


def test_run_gates_a_pruned_recognizer_on_exact_match(prunec_cli, ctc, tmp_path):
    args = ["run", ctc / "rec.onnx", "--passes", "channels", "-O", "channels.round=1", "-o", tmp_path / "p.onnx",
            "--data", ctc / "words.npz", "--metric", f"{CTC}:exact_match", "--max-drop", "1", "--no-profile",
            "--report", tmp_path / "r.json"]
    res = prunec_cli(*args, "-O", "channels.ratio=0.3")  # the 19 weakest hidden channels: all weak ones
    assert res.exit_code == 0, res.output
    gate = json.loads((tmp_path / "r.json").read_text())["gate"]
    assert gate["metric"] == "task:exact_match" and gate["slices"][0]["candidate"]["value"] == 100.0
    res = prunec_cli(*args, "-O", "channels.ratio=0.9")  # identity channels go too: words are lost
    assert res.exit_code == 3, res.output


def test_sensitivity_and_potential_use_the_task_metric(prunec_cli, ctc, tmp_path):
    metric = f"{CTC}:exact_match"
    res = prunec_cli("sensitivity", ctc / "rec.onnx", "--data", ctc / "words.npz", "--metric", metric,
                     "--ratios", "0.3,0.9", "-O", "channels.round=1", "--no-cache", "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    sens = json.loads((tmp_path / "s.json").read_text())["sensitivity"]
    assert sens["metric"] == "task:exact_match" and sens["baseline"] == 100.0
    hidden = next(g for g in sens["groups"] if g["id"] == "hidden")
    assert hidden["trials"][0]["drop"] == 0.0 and hidden["trials"][1]["drop"] > 50
    res = prunec_cli("potential", ctc / "rec.onnx", "--data", ctc / "words.npz", "--metric", metric,
                     "--ratios", "0.3,0.9", "-O", "channels.round=1", "--json", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p.json").read_text())["potential"] == {"clean": 0.3}


def segmenter(threshold: float) -> onnx.ModelProto:
    """image[N,1,8,8] -> 2 class scores per pixel: foreground where the pixel is above `threshold`."""
    return make_model([helper.make_node("Conv", ["image", "w", "b"], ["scores"], name="seg")],
                      [vi("image", ["N", 1, 8, 8])], [vi("scores", ["N", 2, 8, 8])],
                      [init("w", np.array([-1.0, 1.0], np.float32).reshape(2, 1, 1, 1)),
                       init("b", np.array([threshold, -threshold], np.float32))])


def test_mask_iou_example_gates_a_segmenter(prunec_cli, tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (60, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "seg.npz", image=x, targets=(x[:, 0] > 0.5).astype(np.int64))
    onnx.save(segmenter(0.5), str(tmp_path / "seg.onnx"))
    onnx.save(segmenter(0.35), str(tmp_path / "loose.onnx"))  # pixels in 0.35..0.5 turn foreground
    metric = f"{IOU}:mean_iou"
    base = ["--data", tmp_path / "seg.npz", "--metric", metric, "--corruptions", "none", "--max-drop", "2"]
    res = prunec_cli("check", tmp_path / "seg.onnx", tmp_path / "seg.onnx", *base)
    assert res.exit_code == 0, res.output
    res = prunec_cli("check", tmp_path / "seg.onnx", tmp_path / "loose.onnx", *base, "--json", tmp_path / "g.json")
    assert res.exit_code == 3, res.output
    s = json.loads((tmp_path / "g.json").read_text())["slices"][0]
    # Uniform pixels: foreground IoU |x > .5| / |x > .35| = .5/.65, background .35/.5; mean 0.735.
    assert s["original"]["value"] == 100.0 and s["drop"]["value"] == pytest.approx(26.5, abs=3)


def test_loader_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(
        "import numpy as np\n"
        "def good(outputs, targets):\n    return np.ones(len(targets))\n"
        "def mean(outputs, targets):\n    return 1.0\n"
        "def big(outputs, targets):\n    return np.full(len(targets), 100.0)\n"
        "def boom(outputs, targets):\n    raise KeyError('logits')\n"
        "good.chance = 0.1\nvalue = 3\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_metric("mine:good")  # module:function from the Python path
    assert m.name == "good" and m.chance == 0.1 and m({"y": np.zeros((3, 2))}, np.zeros(3)).tolist() == [1, 1, 1]
    assert load_metric(f"{tmp_path / 'mine.py'}:good").digest == m.digest
    for spec, needle in [("mine", "expected module:function"), (f"{tmp_path}/nope.py:f", "no such file"),
                         (f"{tmp_path / 'broken.py'}:f", "raised SyntaxError"), ("mine:value", "no function"),
                         ("mine:missing", "no function"), ("no_such_module_xyz:f", "raised ModuleNotFoundError")]:
        with pytest.raises(OptionError, match=needle):
            load_metric(spec)
    out = {"y": np.zeros((3, 2))}
    for fn, needle in [("mean", r"one score per sample \(not a mean\)"), ("big", r"outside \[0, 1\]"),
                       ("boom", "raised KeyError")]:
        with pytest.raises(DataError, match=needle):
            load_metric(f"mine:{fn}")(out, np.zeros(3))


def test_targets_from_npz_and_csv(tmp_path):
    """`targets`, `targets_<name>` (npz) and a `target` column (CSV) reach the metric."""
    from PIL import Image

    from prunec.eval.data import load_data

    m = segmenter(0.5)
    x = np.zeros((2, 1, 8, 8), np.float32)
    np.savez(tmp_path / "named.npz", image=x, targets_boxes=np.zeros((2, 3, 4)), targets_kind=np.array(["a", "b"]))
    d = load_data(tmp_path / "named.npz", m)
    assert set(d.targets) == {"boxes", "kind"} and d.labels is None
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("file,target,site\na.png,hello,x\nb.png,world,y\n")
    d = load_data(tmp_path, m)
    assert d.targets.tolist() == ["hello", "world"] and set(d.slices) == {"site"}
    (tmp_path / "labels.csv").write_text("file,label\na.png,hello\nb.png,world\n")
    assert load_data(tmp_path, m).targets.tolist() == ["hello", "world"]  # words in `label`
