"""Channel pruning benchmark: prunec vs Torch-Pruning vs onnxsim 0.8.1 on a torchvision zoo.

Run in the benchmark's own environment (torchvision does not import beside torch 2.13.0):

    python -m venv .bench && .bench/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        torch-pruning onnxsim==0.8.1 onnx onnxruntime onnx-graphsurgeon click rich
    PYTHONPATH=. .bench/bin/python benchmarks/channels.py --out benchmarks/results/channels.json

For each model (random weights, BN statistics calibrated on random data) and ratio: prune
time, params and MACs (prunec's one counter for all three tools), ONNX Runtime CPU latency at
batch 1 and 8 with all variants' sessions alternated in one process (a short idle gap before
each timed run so idle sessions' spinning threads do not steal cores), and realized speedup
divided by MAC-reduction speedup. ONNX Runtime's thread spinning is off for all variants (see
`session`).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunec.graph.costs import analyze_costs  # noqa: E402
from prunec.passes import PassManager, build_passes  # noqa: E402


def zoo():
    import torchvision.models as tvm
    from torchvision.models import segmentation

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)

        def forward(self, x):
            return self.m(x)["out"]

    return {
        "resnet18": lambda: tvm.resnet18(),
        "resnet50": lambda: tvm.resnet50(),
        "mobilenet_v2": lambda: tvm.mobilenet_v2(),
        "mobilenet_v3_large": lambda: tvm.mobilenet_v3_large(),
        "efficientnet_b0": lambda: tvm.efficientnet_b0(),
        "densenet121": lambda: tvm.densenet121(),
        "googlenet": lambda: tvm.googlenet(aux_logits=False, init_weights=True),
        "vgg11_bn": lambda: tvm.vgg11_bn(),
        "squeezenet1_0": lambda: tvm.squeezenet1_0(),
        "mnasnet1_0": lambda: tvm.mnasnet1_0(),
        "regnet_y_400mf": lambda: tvm.regnet_y_400mf(),
        "shufflenet_v2_x1_0": lambda: tvm.shufflenet_v2_x1_0(),
        "convnext_tiny": lambda: tvm.convnext_tiny(),
        "lraspp_mobilenet_v3": Seg,
    }


def calibrate_bn(model: nn.Module, size: int) -> nn.Module:
    """Give BN layers running statistics from random data, like a trained net has."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def export(model: nn.Module, size: int) -> onnx.ModelProto:
    f = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.randn(1, 3, size, size),), f, dynamo=False,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers producing the model's output: never pruned (the class count is the API)."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    outs = [last[-1]]
    seg = getattr(model, "m", None)
    if seg is not None and hasattr(seg, "classifier"):
        outs += [seg.classifier.low_classifier, seg.classifier.high_classifier]
    return outs


def prune_prunec(model: onnx.ModelProto, ratio: float, round_to: int | str = "auto"):
    passes = build_passes(["channels"], {"channels": {"ratio": str(ratio), "round": str(round_to)}})
    t0 = time.perf_counter()
    out, report = PassManager(passes).run(model)
    total = time.perf_counter() - t0
    rec = report.passes[0]
    d = rec.result.details
    return out, {"pass_s": rec.seconds, "with_verify_s": total, "groups": d["groups"],
                 "groups_frozen": d["groups_frozen"],
                 "frozen_reasons": sorted({g["frozen"] for g in d["group_table"] if g["frozen"]})[:6]}


def prune_tp(model: nn.Module, ratio: float, size: int):
    import torch_pruning as tp

    m = copy.deepcopy(model)
    ex = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=classifier_layers(m))
    pruner.step()
    seconds = time.perf_counter() - t0
    return export(m, size), {"pass_s": seconds}


def prune_onnxsim(model: onnx.ModelProto, ratio: float):
    import onnxsim

    t0 = time.perf_counter()
    out = onnxsim.apply_structured_pruning(model, sparsity=ratio)
    seconds = time.perf_counter() - t0
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    return out, {"pass_s": seconds}


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # With spinning on, a session that just ran keeps its threads spinning and steals the cores
    # from the next one (measured: LR-ASPP pruned read 7.3 ms with spinning, 3.8 ms without,
    # while its kernels sum to 2.3 ms). Off for every variant alike.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def alternate_latency(models: dict[str, onnx.ModelProto], size: int, batch: int, runs: int,
                      threads: int, gap: float = 0.05) -> dict[str, float]:
    """Median latency (ms) of each model, runs alternated round-robin in one process."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    sessions, errors = {}, {}
    for k, m in models.items():  # a variant that cannot run is reported, the others still timed
        try:
            s = session(m, threads)
            s.run(None, {"input": x})  # warm-up
            sessions[k] = s
        except Exception as exc:
            errors[k] = f"batch {batch}: {str(exc).splitlines()[0][:200]}"
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            time.sleep(gap)
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}, errors


def bench_model(name: str, build, ratios, size: int, threads: int, runs: dict[int, int]) -> list[dict]:
    torch.manual_seed(0)
    model = calibrate_bn(build(), size)
    base = export(model, size)
    base_costs = analyze_costs(base)
    rows = []
    for ratio in ratios:
        variants = {"original": base}
        info = {}
        for tool, fn in (("prunec", lambda: prune_prunec(base, ratio)),
                         ("prunec-round1", lambda: prune_prunec(base, ratio, 1)),
                         ("torch-pruning", lambda: prune_tp(model, ratio, size)),
                         ("onnxsim", lambda: prune_onnxsim(base, ratio))):
            try:
                out, meta = fn()
                costs = analyze_costs(out)
                variants[tool] = out
                info[tool] = {**meta, "params": costs.params, "macs": costs.macs,
                              "macs_kept": costs.macs / base_costs.macs}
            except Exception as exc:  # a peer failing is a result, not a benchmark crash
                info[tool] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                traceback.print_exc(limit=2, file=sys.stderr)
        for batch, n in runs.items():
            lat, errors = alternate_latency(variants, size, batch, n, threads)
            for tool, err in errors.items():
                (info.setdefault(tool, {}) if tool != "original" else info.setdefault("original", {})
                 ).setdefault("run_error", err)
            if "original" not in lat:
                continue
            for tool in list(info):
                if tool not in lat or tool == "original":
                    continue
                speedup = lat["original"] / lat[tool]
                theo = base_costs.macs / info[tool]["macs"]
                info[tool][f"b{batch}_ms"] = lat[tool]
                info[tool][f"b{batch}_orig_ms"] = lat["original"]
                info[tool][f"b{batch}_speedup"] = speedup
                info[tool][f"b{batch}_realized_over_theoretical"] = speedup / theo
        rows.append({"model": name, "ratio": ratio, "params": base_costs.params,
                     "macs": base_costs.macs, "tools": info})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def to_markdown(results: dict) -> str:
    """The results as BENCHMARKS.md tables: one row per model, ratio and tool."""
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    lines = [f"Machine: {results['machine']}, {results['threads']} threads, onnxruntime "
             f"{results['onnxruntime']}, torch {results['torch']}, {results['date']}.", "",
             "| model | ratio | tool | prune s | params | MACs kept | b1 ms (orig) | b1 speedup | b1 real/theo "
             "| b8 ms (orig) | b8 speedup | b8 real/theo | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["rows"]:
        for tool, t in row["tools"].items():
            if tool == "original":
                continue
            note = t.get("error") or t.get("run_error") or ""
            if t.get("groups_frozen"):
                note = (note + f" {t['groups_frozen']}/{t['groups']} groups frozen").strip()
            lines.append(
                f"| {row['model']} | {row['ratio']} | {tool} | {f(t.get('pass_s'), '.3f')} | "
                f"{f(t.get('params'), ',')} | {f(t.get('macs_kept'), '.3f')} | "
                f"{f(t.get('b1_ms'), '.2f')} ({f(t.get('b1_orig_ms'), '.2f')}) | {f(t.get('b1_speedup'), '.2f')} | "
                f"{f(t.get('b1_realized_over_theoretical'), '.2f')} | "
                f"{f(t.get('b8_ms'), '.1f')} ({f(t.get('b8_orig_ms'), '.1f')}) | {f(t.get('b8_speedup'), '.2f')} | "
                f"{f(t.get('b8_realized_over_theoretical'), '.2f')} | {note[:90]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated subset of the zoo")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs1", type=int, default=15, help="timed runs per model at batch 1")
    ap.add_argument("--runs8", type=int, default=5, help="timed runs per model at batch 8")
    ap.add_argument("--out", default="benchmarks/results/channels.json")
    ap.add_argument("--render", default=None, metavar="RESULTS.json",
                    help="print the markdown tables of an earlier run and exit")
    args = ap.parse_args()
    if args.render:
        print(to_markdown(json.loads(Path(args.render).read_text())))
        return
    all_models = zoo()
    names = args.models.split(",") if args.models else list(all_models)
    ratios = [float(r) for r in args.ratios.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "onnxruntime": ort.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "rows": []}
    for name in names:
        results["rows"] += bench_model(name, all_models[name], ratios, args.size, args.threads,
                                       {1: args.runs1, 8: args.runs8})
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
