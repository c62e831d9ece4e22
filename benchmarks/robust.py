"""Robust recovery benchmark (issue 19): does recovery keep accuracy on degraded inputs, not only
on clean ones? Rows: plain removal / reconstruct calibrated on clean samples / reconstruct with
corrupted calibration views (prunec.eval.calib_views, fraction 0.5, severities 1-5, targets = the
original on each view) / the same with importance=reconstruction / (demo) a sensitivity plan
whose drops are the worst gated slice; beside them onnxsim 0.8.1's recovery.

    bash benchmarks/setup_real.sh       # once: /work/venvs/real (rapidocr_onnxruntime 1.4.4,
                                        # onnxsim==0.8.1, pillow, fonts-dejavu-core, ...)
    PYTHONPATH=$PWD /work/venvs/real/bin/python benchmarks/robust.py [--only demo,ocr]
        [--cuts 0.10,0.15,0.20,0.30] [--json benchmarks/results/robust.json]
    # the recognizer with a sensitivity plan; every recipe tried, on test and validation words:
    PYTHONPATH=$PWD /work/venvs/real/bin/python benchmarks/robust.py --only ocr-plan,ocr-recipes

- demo: models/demo_cnn.onnx (fold-bn, cleanup first), calibrated on the train split without
  labels, top-1 on the held-out test split, clean and each corruption slice of prunec.eval at
  severity 3; "worst" is the largest drop among slices where the original is above 50%.
  Sensitivity plans are measured on 400 train samples (with labels), never on the test split.
- ocr: the PP-OCRv4 recognizer of rapidocr_onnxruntime 1.4.4, calibrated on 128 clean renders of
  other words (plus 128 corrupted views where a row says so); exact match on 200 clean and 200
  degraded renders (low contrast, blur, noise, rotation: benchmarks/realdata.py), which are not
  prunec's corruptions. `round=1`.

A cut is a uniform channels.ratio chosen per model to remove about that share of the MACs (the
table gives the share actually removed). Seconds are the passes' own time (no verification).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from prunec.eval.calib_views import add_views  # noqa: E402
from prunec.graph.costs import analyze_costs  # noqa: E402
from prunec.passes import Calibration, PassContext, PassManager, build_passes  # noqa: E402
from prunec.runtime.session import make_session  # noqa: E402

#: (label, passes after channels, channels options, calibration: None | "clean" | "views")
ROWS = [
    ("plain", [], {"compensate": "none"}, None),
    ("reconstruct, clean calib", ["reconstruct"], {"compensate": "mean"}, "clean"),
    ("reconstruct, + corrupted views", ["reconstruct"], {"compensate": "mean"}, "views"),
    ("importance=reconstruction, + views", ["reconstruct"],
     {"compensate": "mean", "importance": "reconstruction"}, "views"),
]
#: channels.ratio giving about each share of MACs removed (measured: demo ratio 0.3 -> 43.5%,
#: recognizer ratio 0.1 -> 17.6% with round=1).
DEMO_RATIOS = {0.10: 0.07, 0.15: 0.1, 0.20: 0.135, 0.30: 0.2, "0.3 (target)": 0.3}
OCR_RATIOS = {0.10: 0.055, 0.15: 0.085, 0.20: 0.115, 0.30: 0.175}


def macs(model: onnx.ModelProto, shapes: dict) -> int:
    return analyze_costs(model, shapes).macs


def prune(model, calib: Calibration | None, pre, post, channels_opts, shapes, plan=None):
    """(pruned model, seconds of the passes)."""
    names = pre + ["channels"] + post
    copts = {k: str(v) for k, v in channels_opts.items()}
    if plan is not None:
        copts.pop("ratio", None)
        copts["plan"] = plan
    ctx = PassContext(input_shapes=shapes, calib=calib)
    out, report = PassManager(build_passes(names, {"channels": copts}), ctx=ctx, verify=False).run(model)
    return out, sum(p.seconds for p in report.passes)


def calibs(model, arrays: dict) -> dict:
    clean = Calibration(dict(arrays), "calibration")
    views = add_views(Calibration(dict(arrays), "calibration"), model, corruptions="auto", fraction=0.5)
    print(f"  {views.note}", flush=True)
    return {None: None, "clean": clean, "views": views}


def table(model, cal, evaluate, shapes, cuts: dict, *, pre, extra_opts, rows=ROWS, log=print):
    base = macs(model, shapes)
    out = []
    for cut, ratio in cuts.items():
        for label, post, opts, which in rows:
            t = time.perf_counter()
            m, sec = prune(model, cal[which], pre, post, {"ratio": ratio, **extra_opts, **opts}, shapes)
            row = {"cut": cut, "ratio": ratio, "method": f"prunec {label}",
                   "macs_removed": 1 - macs(m, shapes) / base, "seconds": sec, **evaluate(m),
                   "wall": time.perf_counter() - t}
            out.append(row)
            log(f"  {row}")
    return out


def onnxsim_rows(model, ratio, cut, calib_arrays, evaluate, shapes):
    """onnxsim 0.8.1: structured pruning, then each of its recovery functions on top."""
    from recover import batches, onnxsim_table

    rows = onnxsim_table(model, ratio, batches(calib_arrays), lambda m: (evaluate(m), None), shapes, convs=True)
    out = []
    for r in rows:
        if "error" in r:
            out.append({"cut": cut, "ratio": ratio, "method": r["method"], "error": r["error"]})
            continue
        out.append({"cut": cut, "ratio": ratio, "method": r["method"], "macs_removed": 1 - r["macs_kept"],
                    "seconds": r["seconds"], **r["clean"]})
    return out


# ---------------------------------------------------------------- demo CNN


def demo(results: dict, cuts: list) -> None:
    import realdata as R
    from prunec.eval.budget import Budget, allocate
    from prunec.eval.corruptions import parse_corruptions
    from prunec.eval.data import EvalData
    from prunec.eval.gate import Evaluator
    from prunec.eval.sensitivity import sensitivity

    model = onnx.load(str(R.REPO / "models" / "demo_cnn.onnx"))
    d = R.demo_data()
    corr = parse_corruptions("all")
    ev = Evaluator(model, EvalData({"image": d["test"]["image"]}, d["test"]["labels"]), corruptions=corr,
                   severities=[3])
    variants = ["clean"] + [f"{c}@3" for c in corr]
    orig = {v: ev.reference_value(v) for v in variants}
    gated = [v for v in variants if orig[v] > 50]

    def evaluate(m):
        outs = ev.outputs(m)
        vals = {v: float(ev.scores(v, outs[v])[1].mean() * 100) for v in variants}
        worst = max(gated, key=lambda v: orig[v] - vals[v])
        return {**vals, "worst": worst, "worst_drop": orig[worst] - vals[worst]}

    shapes = {"image": (1, 1, 8, 8)}
    out = results.setdefault("demo", {"original": orig, "gated": gated})
    print(f"demo original: {orig}; gated (original > 50%): {gated}", flush=True)
    cal = calibs(model, {"image": d["train"]["image"]})
    folded, _ = PassManager(build_passes(["fold-bn", "cleanup"], {}), verify=True).run(model)
    chosen = {k: v for k, v in DEMO_RATIOS.items() if k in cuts or isinstance(k, str)}
    # round=1 below the target row: the CPU channel block would round small ratios to nothing.
    rows = table(model, cal, evaluate, shapes, {k: v for k, v in chosen.items() if not isinstance(k, str)},
                 pre=["fold-bn", "cleanup"], extra_opts={"round": 1})
    rows += table(model, cal, evaluate, shapes, {k: v for k, v in chosen.items() if isinstance(k, str)},
                  pre=["fold-bn", "cleanup"], extra_opts={})
    out["rows"] = rows
    _save(results)
    # Sensitivity plan: per-group drops = worst gated slice, measured on train samples.
    sens_ev = Evaluator(model, EvalData({"image": d["train"]["image"][:400]}, d["train"]["labels"][:400]),
                        corruptions=corr, severities=[3])
    ctx = PassContext(input_shapes=shapes, calib=cal["views"])
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sens = sensitivity(model, sens_ev, [0.2, 0.4, 0.6], ctx=ctx, cache=Path(tmp), options={"round": 1})
        sens_sec = time.perf_counter() - t
        print(f"  sensitivity: {sens_sec:.0f} s", flush=True)
        base = macs(model, shapes)
        for cut in [c for c in chosen if not isinstance(c, str)]:
            try:
                plan = allocate(model, sens, Budget("macs", 1 - cut), options={"round": 1},
                                ctx=PassContext(input_shapes=shapes, calib=cal["views"]))
            except Exception as exc:  # noqa: BLE001 - a budget out of reach is a result
                rows.append({"cut": cut, "method": "prunec sensitivity plan + views", "error": str(exc)[:120]})
                continue
            path = Path(tmp) / "plan.json"
            path.write_text(json.dumps(plan.to_dict()))
            try:
                m, sec = prune(model, cal["views"], [], ["reconstruct"],
                               {"compensate": "mean", "round": 1}, shapes, plan=str(path))
            except Exception as exc:  # noqa: BLE001
                rows.append({"cut": cut, "method": "prunec sensitivity plan + views", "error": str(exc)[:120]})
                continue
            rows.append({"cut": cut, "ratio": None, "method": "prunec sensitivity plan + views, reconstruct",
                         "macs_removed": 1 - macs(m, shapes) / base, "seconds": sec + sens_sec, **evaluate(m)})
            print(f"  {rows[-1]}", flush=True)
            out["rows"] = rows
            _save(results)
    rows += onnxsim_rows(folded, 0.3, "0.3 (target)", {"image": d["train"]["image"]}, evaluate, shapes)
    out["rows"] = rows


# ---------------------------------------------------------------- OCR recognizer


def ocr_scorer(sets: dict[str, tuple], batch: int = 50):
    """evaluate(model) -> {set name: exact match of the greedy-decoded words}, for recognizer
    inputs and their words by set name."""
    import realdata as R

    def evaluate(m):
        sess, out = make_session(m), {}
        for key, (x, labels) in sets.items():
            probs = np.concatenate([sess.run(None, {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
            out[key] = R.exact_match(R.ctc_decode(probs), labels)
        return out

    return evaluate


def ocr(results: dict, cuts: list) -> None:
    import realdata as R

    model = onnx.load(str(R.rapidocr_models()["rec"]))
    xc, lc = R.ocr_words(200, seed=0)
    xd, ld = R.ocr_words(200, seed=0, degraded=True)
    xcal, _ = R.ocr_words(128, seed=1, offset=1000)
    shapes = {"x": (1, 3, 48, 320)}

    evaluate = ocr_scorer({"clean": (xc, lc), "degraded": (xd, ld)})

    orig = evaluate(model)
    out = results.setdefault("ocr", {"original": orig})
    print(f"ocr original: {orig}", flush=True)
    cal = calibs(model, {"x": xcal})
    chosen = {c: OCR_RATIOS[c] for c in cuts if c in OCR_RATIOS}  # in the order asked
    rows = []
    # All rows at the first cut; only the view rows at the others (time).
    first = next(iter(chosen), None)
    for cut, ratio in chosen.items():
        rs = ROWS if cut == first else [r for r in ROWS if r[3] == "views"]
        rows += table(model, cal, evaluate, shapes, {cut: ratio}, pre=[], extra_opts={"round": 1}, rows=rs)
        out["rows"] = rows
        _save(results)
    if first is not None:
        rows += onnxsim_rows(model, chosen[first], first, {"x": xcal}, evaluate, shapes)
    out["rows"] = rows


def ocr_plan(results: dict, cuts: list) -> None:
    """The recognizer with a sensitivity plan: per-group drops of plain removal measured on
    validation words (neither calibration nor test words) on clean renders and prunec's own
    corruptions at severity 3 (the worst of them per trial), a plan per MACs budget, then
    importance=reconstruction with corrupted calibration views, reconstruct and recalibrate."""
    import realdata as R
    from prunec.eval.budget import Budget, allocate
    from prunec.eval.corruptions import parse_corruptions
    from prunec.eval.data import EvalData
    from prunec.eval.gate import Evaluator, predict
    from prunec.eval.sensitivity import sensitivity

    model = onnx.load(str(R.rapidocr_models()["rec"]))
    xc, lc = R.ocr_words(200, seed=0)
    xd, ld = R.ocr_words(200, seed=0, degraded=True)
    xcal, _ = R.ocr_words(CALIB_WORDS, seed=1, offset=1000)
    xval, _ = R.ocr_words(VAL_WORDS, seed=2, offset=3000)
    shapes = {"x": (1, 3, 48, 320)}

    evaluate = ocr_scorer({"clean": (xc, lc), "degraded": (xd, ld)})

    orig = evaluate(model)
    out = results.setdefault("ocr", {"original": orig})
    rows = out.setdefault("rows", [])
    views = add_views(Calibration({"x": xcal}, "calibration"), model, corruptions=PLAN_VIEWS, fraction=0.5)
    print(f"  {views.note}", flush=True)
    # Labels: the original's own per-position path, so a trial's metric is exact agreement of it.
    labels = predict(model, {"x": xval}).argmax(-1)
    corr = parse_corruptions(PLAN_VIEWS)
    ev = Evaluator(model, EvalData({"x": xval}, labels), corruptions=corr, severities=[3], batch_size="auto")
    print(f"  sensitivity data: {VAL_WORDS} validation words, {ev.batch.describe()}", flush=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sens = sensitivity(model, ev, PLAN_RATIOS, ctx=PassContext(input_shapes=shapes), cache=Path(tmp),
                           options={"round": 1, "compensate": "none"})
        sens_sec = time.perf_counter() - t
        print(f"  sensitivity: {sens_sec:.0f} s", flush=True)
        base = macs(model, shapes)
        for cut in cuts:
            try:
                plan = allocate(model, sens, Budget("macs", 1 - cut), options={"round": 1},
                                ctx=PassContext(input_shapes=shapes))
            except Exception as exc:  # noqa: BLE001 - a budget out of reach is a result
                rows.append({"cut": cut, "method": "prunec sensitivity plan", "error": str(exc)[:120]})
                continue
            path = Path(tmp) / "plan.json"
            path.write_text(json.dumps(plan.to_dict()))
            m, sec = prune(model, views, [], ["reconstruct", "recalibrate"],
                           {"compensate": "mean", "importance": "reconstruction", "round": 1}, shapes,
                           plan=str(path))
            rows.append({"cut": cut, "ratio": None,
                         "method": "prunec sensitivity plan + views, importance=reconstruction, "
                                   "reconstruct, recalibrate",
                         "macs_removed": 1 - macs(m, shapes) / base, "seconds": sec + sens_sec, **evaluate(m)})
            print(f"  {rows[-1]}", flush=True)
            _save(results)


#: Recipes tried on the recognizer on 2026-12-01 (every one, in order), all with
#: importance=reconstruction, compensate=mean, round=1, 128 calibration words + as many corrupted
#: views, then reconstruct and recalibrate: (channels.ratio, views, channels options, reconstruct options).
RECIPES = [
    (0.09, "all,rotation", {}, {}),
    (0.09, "all,rotation,mixed", {}, {}),
    (0.09, "all,mixed", {}, {}),
    (0.09, "all,rotation", {}, {"positions": "128"}),
    (0.09, "all,rotation", {}, {"ridge": "0.01"}),
    (0.09, "all,rotation", {}, {"ridge": "0.0001"}),
    (0.105, "all,rotation", {"protect": r"p2o\.Conv\.(0|2|4|6|8|10)$"}, {}),
    (0.09, "all,rotation", {"global": "true"}, {}),
    (0.12, "all,rotation", {"global": "true"}, {}),
    (0.105, "all,rotation", {"protect_early": "0.12"}, {}),
    (0.065, "all,rotation", {"protect_early": "0.12"}, {}),
    (0.135, "all,rotation", {"protect_early": "0.12"}, {}),
    (0.2, "all,rotation", {"protect_early": "0.12"}, {}),
]


def ocr_recipes(results: dict, cuts: list) -> None:
    """Each of RECIPES on the recognizer, scored on the 200 + 200 test words and on 200 + 200
    validation words (other words, same renderer), so a choice can be made on validation."""
    import realdata as R

    model = onnx.load(str(R.rapidocr_models()["rec"]))
    shapes = {"x": (1, 3, 48, 320)}
    evaluate = ocr_scorer({"test_clean": R.ocr_words(200, seed=0),
                           "test_degraded": R.ocr_words(200, seed=0, degraded=True),
                           "val_clean": R.ocr_words(200, seed=2, offset=3000),
                           "val_degraded": R.ocr_words(200, seed=2, offset=3000, degraded=True)}, batch=25)

    base = macs(model, shapes)
    out = results.setdefault("ocr_recipes", {"original": evaluate(model), "rows": []})
    print(f"original: {out['original']}", flush=True)
    xcal, _ = R.ocr_words(128, seed=1, offset=1000)
    for ratio, views, copts, ropts in RECIPES:
        t = time.perf_counter()
        cal = add_views(Calibration({"x": xcal}, "calibration"), model, corruptions=views, fraction=0.5)
        opts = {"ratio": str(ratio), "compensate": "mean", "importance": "reconstruction", "round": "1", **copts}
        m, _ = PassManager(build_passes(["channels", "reconstruct", "recalibrate"],
                                        {"channels": opts, "reconstruct": ropts}),
                           ctx=PassContext(input_shapes=shapes, calib=cal), verify=False).run(model)
        row = {"ratio": ratio, "views": views, "channels": copts, "reconstruct": ropts,
               "macs_removed": 1 - macs(m, shapes) / base, **evaluate(m), "wall": time.perf_counter() - t}
        out["rows"].append(row)
        print(f"  {row}", flush=True)
        _save(results)


#: The recognizer's plan: validation and calibration words, trial ratios, corruptions.
VAL_WORDS = 128
CALIB_WORDS = 128
PLAN_RATIOS = [0.1, 0.2, 0.35]
PLAN_VIEWS = "all,rotation"


# ---------------------------------------------------------------- output

_JSON: Path | None = None


def _save(results: dict) -> None:
    if _JSON:
        _JSON.parent.mkdir(parents=True, exist_ok=True)
        _JSON.write_text(json.dumps(results, indent=1, default=str))


def fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{v:.1f}" if pct else f"{v:.3f}"


def print_tables(results: dict) -> None:
    if "demo" in results:
        doc = results["demo"]
        vs = list(doc["original"])
        print("\n### demo CNN (top-1 %, held-out split; corruptions at severity 3)\n")
        print("| cut | method | MACs removed | " + " | ".join(vs) + " | worst (drop) | seconds |")
        print("|---" * (len(vs) + 5) + "|")
        print("| - | original | 0% | " + " | ".join(fmt(doc["original"][v], True) for v in vs) + " | - | - |")
        for r in doc.get("rows", []):
            if "error" in r:
                print(f"| {r['cut']} | {r['method']} | fails: {r['error']} |" + " |" * (len(vs) + 2))
                continue
            worst = f"{r['worst']} ({r['worst_drop']:+.1f})" if "worst" in r else "-"
            print(f"| {r['cut']} | {r['method']} | {r['macs_removed']:.1%} | "
                  + " | ".join(fmt(r.get(v), True) for v in vs) + f" | {worst} | {r['seconds']:.1f} |")
    if "ocr" in results:
        doc = results["ocr"]
        o = doc["original"]
        print("\n### PP-OCRv4 recognizer (exact match, 200 words each)\n")
        print("| cut | method | MACs removed | clean | degraded | worst drop | seconds |")
        print("|---|---|---|---|---|---|---|")
        print(f"| - | original | 0% | {o['clean']:.3f} | {o['degraded']:.3f} | - | - |")
        for r in doc.get("rows", []):
            if "error" in r:
                print(f"| {r['cut']} | {r['method']} | fails: {r['error']} | | | | |")
                continue
            worst = max(o["clean"] - r["clean"], o["degraded"] - r["degraded"])
            print(f"| {r['cut']} | {r['method']} | {r['macs_removed']:.1%} | {r['clean']:.3f} | "
                  f"{r['degraded']:.3f} | {worst:+.3f} | {r['seconds']:.1f} |")


def main() -> None:
    global _JSON
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="demo,ocr")
    ap.add_argument("--cuts", default="0.10,0.15,0.20,0.30")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    _JSON = Path(args.json) if args.json else None
    cuts = [round(float(c), 2) for c in args.cuts.split(",")]
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True,
                         check=False).stdout.split(":")[-1].strip()
    results: dict = {"machine": {"cpu": cpu or platform.machine(), "cores": os.cpu_count(),
                                 "date": str(datetime.datetime.now(datetime.timezone.utc)),
                                 "load": os.getloadavg()}}
    for name in args.only.split(","):
        {"demo": demo, "ocr": ocr, "ocr-plan": ocr_plan, "ocr-recipes": ocr_recipes}[name](results, cuts)
        _save(results)
    results["machine"]["load_after"] = os.getloadavg()
    _save(results)
    print_tables(results)


if __name__ == "__main__":
    main()
