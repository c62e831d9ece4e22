"""Benchmark (issue 15): distillation and int8 after channel pruning, on the demo CNN, the PP-OCRv4
text recognizer and all-MiniLM-L6-v2.

    bash benchmarks/setup_real.sh        # the venv /work/venvs/real (rec and MiniLM)
    PYTHONPATH=$PWD /work/venvs/real/bin/python benchmarks/distill_int8.py \
        [--models demo,rec,minilm] [--budgets 60,300] [--threads 1] [--out benchmarks/results]

Rows per model, each through prunec's PassManager (verified like `prunec run`):
  original; pruned (`channels`); +distill at each budget (seconds of training); the longest
  distilled model +int8 calibrated on itself (the pass's default); the same +int8 with activation
  ranges measured on the original instead (`int8.calibrate-on=baseline`, the failure mode). Columns:
  MACs, the model's metric (clean and degraded/other slice), seconds spent in the pass, and ONNX
  Runtime CPU latency at batch 1 against the original, interleaved (ABBA) by
  prunec.eval.profile.compare_models with a 95% interval. int8 is also timed against the float
  model it was made from. Calibration samples are disjoint from the evaluation samples.

Models and metrics: demo (models/demo_cnn.onnx) at channels.ratio 0.5, held-out top-1 on
models/demo_digits_test.npz (calibration: the train split) and agreement under Gaussian noise;
rec (rapidocr's ch_PP-OCRv4_rec_infer.onnx) at ratio 0.22 with round=1 (36% of MACs), exact match on
200 clean and 200 degraded word renders (calibration: 256 other clean words); MiniLM (exported
with realdata.export_minilm) with only the MLP neurons (`intermediate` MatMuls) at 0.5, mean and min
cosine of mean-pooled sentence embeddings to the original's and the Spearman correlation of
pairwise similarities on 200 sentences (calibration: 512 other sentences). The attention-heads
pass (issue 14) is not on main, so MiniLM rows prune the MLP only.
Writes distill_int8.json and distill_int8.md (the tables for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunec.eval.profile import compare_models
from prunec.graph.costs import analyze_costs
from prunec.graph.ir import from_onnx, normalize, to_onnx
from prunec.passes import PassContext, PassManager, build_passes
from prunec.passes.base import Calibration


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, feeds: dict, batch: int = 32) -> np.ndarray:
    sess = _session(model)
    n = len(next(iter(feeds.values())))
    outs = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs)


# ------------------------------------------------------------------------------------ models

def demo_spec() -> dict:

    tr, te = np.load(ROOT / "models/demo_digits_train.npz"), np.load(ROOT / "models/demo_digits_test.npz")
    rng = np.random.default_rng(0)
    noisy = (te["image"] + rng.normal(0, 0.5 * te["image"].std(), te["image"].shape)).astype(np.float32)

    def evaluate(model, ref=None):
        clean = _run(model, {"image": te["image"]}).argmax(1)
        noise = _run(model, {"image": noisy}).argmax(1)
        return {"top1": float((clean == te["labels"]).mean() * 100),
                "top1_noise": float((noise == te["labels"]).mean() * 100)}

    return {"name": "demo", "model": onnx.load(str(ROOT / "models/demo_cnn.onnx")), "shapes": {},
            "channels": {"ratio": 0.5}, "pre": ["fold-bn", "cleanup"],
            "calib": {"image": tr["image"]}, "evaluate": evaluate,
            "metrics": ("top1", "top1_noise"), "batch": 32, "lr": 1e-3}


def rec_spec() -> dict:
    import realdata

    x_cal, _ = realdata.ocr_words(256, seed=7, offset=1000)
    x_clean, y_clean = realdata.ocr_words(200, seed=1)
    x_deg, y_deg = realdata.ocr_words(200, seed=2, degraded=True)

    def evaluate(model, ref=None):
        pc = realdata.ctc_decode(_run(model, {"x": x_clean}, 16))
        pd = realdata.ctc_decode(_run(model, {"x": x_deg}, 16))
        return {"exact_clean": realdata.exact_match(pc, y_clean) * 100,
                "exact_degraded": realdata.exact_match(pd, y_deg) * 100}

    return {"name": "rec", "model": onnx.load(str(realdata.rapidocr_models()["rec"])),
            "shapes": {"x": (1, 3, 48, 320)}, "channels": {"ratio": 0.22, "round": 1}, "pre": [],
            "calib": {"x": x_cal}, "evaluate": evaluate, "metrics": ("exact_clean", "exact_degraded"),
            "batch": 8, "lr": 1e-3}


def minilm_spec(tmp: Path) -> dict:
    import realdata

    path = realdata.export_minilm(tmp / "minilm.onnx")
    model = onnx.load(str(path))
    cal = realdata.tokenize(realdata.sentences(512, offset=1000), 64, pad_to_max=True)
    ev = realdata.tokenize(realdata.sentences(200), 64, pad_to_max=True)
    ref_emb = realdata.mean_pool(_run(model, ev), ev["attention_mask"])

    def evaluate(m, ref=None):
        emb = realdata.mean_pool(_run(m, ev), ev["attention_mask"])
        return realdata.embedding_fidelity(ref_emb, emb)

    return {"name": "minilm", "model": model,
            "shapes": {k: (1, 64) for k in ("input_ids", "attention_mask", "token_type_ids")},
            "channels": {"ratio": 0.5, "round": 1, "protect": "^(?!.*intermediate)"}, "pre": [],
            "calib": cal, "evaluate": evaluate, "metrics": ("mean_cos", "min_cos", "spearman"), "batch": 32,
            "lr": 1e-4}  # a pretrained transformer: the usual fine-tuning rate


# ------------------------------------------------------------------------------------ rows

def _manager(names, options, spec, seed=0):
    ctx = PassContext(input_shapes=spec["shapes"], seed=seed,
                      calib=Calibration(spec["calib"], "benchmark calibration split"))
    return PassManager(build_passes(names, options), ctx=ctx)


def _apply_with_baseline(model, names, options, spec, baseline):
    """Run passes on `model` with `baseline` as the run's baseline (for int8.calibrate-on=baseline
    on an already distilled model), verifying nothing: the comparison row only."""
    ctx = PassContext(input_shapes=spec["shapes"], calib=Calibration(spec["calib"], "benchmark"))
    ctx.baseline = baseline
    graph = from_onnx(model)
    for p in build_passes(names, options):
        p.run(graph, ctx)
        normalize(graph)
    return to_onnx(graph, model)


def _latency(before, after, spec, seconds: float) -> dict:
    rep = compare_models(before, after, batches=(1,), input_shapes=spec["shapes"] or None,
                         seconds=seconds, ops=False, memory=False)
    s = rep.speedups[0]
    return {"speedup": round(s.speedup, 3), "ci": [round(s.ci[0], 3), round(s.ci[1], 3)],
            "before_ms": round(rep.before.at(1).p50_ms, 3), "after_ms": round(rep.after.at(1).p50_ms, 3)}


def run_model(spec: dict, budgets: list[int], threads: int, lat_s: float) -> list[dict]:
    orig, rows = spec["model"], []

    def row(label, model, seconds=None, extra=None):
        costs = analyze_costs(model, spec["shapes"] or None)
        r = {"model": spec["name"], "row": label, "macs": costs.macs, **spec["evaluate"](model),
             "pass_seconds": seconds, **(extra or {})}
        if model is not orig:
            r["latency_vs_original"] = _latency(orig, model, spec, lat_s)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    row("original", orig)
    # The exact passes first, as `prunec run` would: their output is the run's baseline (teacher).
    prepped = _manager(spec["pre"], {}, spec).run(orig)[0] if spec["pre"] else orig
    pruned, rep = _manager(["channels"], {"channels": spec["channels"]}, spec).run(prepped)
    row("pruned", pruned, round(sum(p.seconds for p in rep.passes), 1))
    distilled = None
    for b in budgets:
        opts = {"channels": spec["channels"],
                "distill": {"seconds": b, "threads": threads, "batch": spec["batch"], "lr": spec["lr"]}}
        distilled, rep = _manager(["channels", "distill"], opts, spec).run(prepped)
        d = rep.passes[-1].result.details
        row(f"+distill {b}s", distilled, round(rep.passes[-1].seconds, 1),
            {"steps": d.get("steps"), "held_out_loss": d.get("held_out_loss")})
    base = distilled if distilled is not None else pruned
    tag = f"+distill {budgets[-1]}s " if distilled is not None else ""
    q, rep = _manager(["int8"], {}, spec).run(base)
    r = row(f"{tag}+int8", q, round(rep.passes[-1].seconds, 1))
    r["latency_vs_float"] = _latency(base, q, spec, lat_s)
    print(json.dumps({"int8_vs_float": r["latency_vs_float"]}), flush=True)
    qb = _apply_with_baseline(base, ["int8"], {"int8": {"calibrate-on": "baseline"}}, spec, prepped)
    row(f"{tag}+int8 calibrated on the original", qb)
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        metrics = [k for k in ("top1", "top1_noise", "exact_clean", "exact_degraded", "mean_cos", "min_cos",
                               "spearman") if k in rs[0]]
        out.append(f"\n**{name}**\n")
        out.append("| row | MACs | " + " | ".join(metrics) + " | pass s | steps | speedup vs original (95% CI) |")
        out.append("|---|---|" + "---|" * len(metrics) + "---|---|---|")
        for r in rs:
            lat = r.get("latency_vs_original")
            sp = f"{lat['speedup']:.2f}x ({lat['ci'][0]:.2f}-{lat['ci'][1]:.2f})" if lat else "1"
            if r.get("latency_vs_float"):
                f = r["latency_vs_float"]
                sp += f"; vs float {f['speedup']:.2f}x ({f['ci'][0]:.2f}-{f['ci'][1]:.2f})"
            vals = " | ".join(f"{r[m]:.3f}" if m in ("mean_cos", "min_cos", "spearman") else f"{r[m]:.1f}"
                              for m in metrics)
            out.append(f"| {r['row']} | {r['macs'] / 1e6:.1f}M | {vals} | {r.get('pass_seconds') or ''} | "
                       f"{r.get('steps') or ''} | {sp} |")
    return "\n".join(out) + "\n"


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,rec,minilm")
    ap.add_argument("--budgets", default="60,300", help="distill.seconds values, comma separated")
    ap.add_argument("--threads", type=int, default=1, help="distill.threads (1: best on a busy machine)")
    ap.add_argument("--latency-seconds", type=float, default=4.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--importance", default=None,
                    help="channels.importance for every model (e.g. reconstruction: issue 11's output-aware "
                         "selection with compensation, so distill starts from a recovered model)")
    ap.add_argument("--reconstruct", action="store_true",
                    help="channels.reconstruct=true: the readers are re-fitted by least squares before distill")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t0 = time.time()
            spec = {"demo": demo_spec, "rec": rec_spec, "minilm": lambda: minilm_spec(Path(tmp))}[name]()
            if args.importance:
                spec["channels"] = {**spec["channels"], "importance": args.importance}
            if args.reconstruct:
                spec["channels"] = {**spec["channels"], "reconstruct": True}
            rows += run_model(spec, budgets, args.threads, args.latency_seconds)
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)
            (out / "distill_int8.json").write_text(json.dumps(rows, indent=1))
            (out / "distill_int8.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
