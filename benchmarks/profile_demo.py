"""Profile benchmark: measured vs MAC-predicted speedup of channel pruning on ONNX Runtime CPU.

    PYTHONPATH=$PWD python benchmarks/profile_demo.py [--out benchmarks/results] [--quick]

Pairs measured (each pair interleaved in one process by `compare_models`):
  1. the demo CNN (models/demo_cnn.onnx, or a small CNN built here if that file is absent)
     against itself pruned by `fold-bn,channels` at ratio 0.5;
  2. ResNet-50 (random weights, 224x224) against itself pruned by `fold-bn,channels` at 0.5;
  3. ResNet-50 against a hand-narrowed ResNet-50 (every width halved), the idealised target.
Writes one JSON per pair (no raw samples) and `profile.md`, the table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunec.eval.profile import CompareReport, compare_models  # noqa: E402
from prunec.passes import PassContext, PassManager, build_passes  # noqa: E402
from prunec.report.format import human, nbytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_cnn(path: Path) -> None:
    """A stand-in for the demo model: 4 conv-BN-ReLU stages on 3x32x32, global pool, linear head."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, cin = [], 3
    for cout, stride in ((32, 1), (64, 2), (128, 2), (128, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)


def prune(src: Path, dst: Path, ratio: float = 0.5) -> None:
    """fold-bn then channels at `ratio`, verified by the pass manager, saved to `dst`."""
    passes = build_passes(["fold-bn", "channels"], {"channels": {"ratio": ratio}})
    result, _ = PassManager(passes, ctx=PassContext()).run(onnx.load(str(src)))
    onnx.save(result, str(dst))


def row(name: str, rep: CompareReport) -> list[str]:
    """Markdown rows: one per batch size."""
    rows = []
    for sp in rep.speedups:
        b, a = rep.before.at(sp.batch), rep.after.at(sp.batch)
        rows.append(
            f"| {name} | {sp.batch} | {human(rep.before.costs.macs[sp.batch])} → "
            f"{human(rep.after.costs.macs[sp.batch])} | {b.p50_ms:.3g} → {a.p50_ms:.3g} | "
            f"{human(b.items_per_s)} → {human(a.items_per_s)} | "
            f"**{sp.speedup:.2f}x** [{sp.ci[0]:.2f}, {sp.ci[1]:.2f}] | {sp.theoretical:.2f}x | "
            f"{100 * sp.realized:.0f}% | {sp.pairs} / {sp.sessions} |")
    return rows


def ops_rows(name: str, rep: CompareReport, limit: int = 6) -> list[str]:
    """Markdown rows of the per-op-type breakdown (ORT profiler), before vs after."""
    ob, oa = rep.before.ops, rep.after.ops
    out = []
    for op in list(dict.fromkeys(list(ob.by_op_ms) + list(oa.by_op_ms)))[:limit]:
        v0, v1 = ob.by_op_ms.get(op, 0.0), oa.by_op_ms.get(op, 0.0)
        out.append(f"| {name} | {op} | {ob.op_counts.get(op, 0)} → {oa.op_counts.get(op, 0)} | "
                   f"{v0:.3g} | {v1:.3g} | {v0 / v1:.2f}x |" if v1 else f"| {name} | {op} | | {v0:.3g} | 0 | |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="short budgets (smoke test, noisy numbers)")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from resnet import export_resnet50

    results: list[tuple[str, CompareReport]] = []
    with tempfile.TemporaryDirectory(prefix="prunec-bench-") as d:
        tmp = Path(d)
        demo = ROOT / "models" / "demo_cnn.onnx"
        demo_name = "demo_cnn.onnx"
        if not demo.exists():
            demo, demo_name = tmp / "small_cnn.onnx", "small CNN (demo stand-in)"
            small_cnn(demo)
        prune(demo, tmp / "demo_p50.onnx")
        pairs = [(demo_name + " vs channels 0.5", demo, tmp / "demo_p50.onnx", (1, 8, 32),
                  1.0 if args.quick else 6.0)]
        if not args.skip_resnet:
            r50, narrow = tmp / "r50.onnx", tmp / "r50_w05.onnx"
            export_resnet50(str(r50))
            export_resnet50(str(narrow), width=0.5)
            prune(r50, tmp / "r50_p50.onnx")
            secs = 3.0 if args.quick else 24.0
            pairs += [("ResNet-50 vs channels 0.5", r50, tmp / "r50_p50.onnx", (1, 8), secs),
                      ("ResNet-50 vs hand-narrowed x0.5", r50, narrow, (1, 8), secs)]
        for name, a, b, batches, secs in pairs:
            t0 = time.time()
            load = os.getloadavg()[0]
            rep = compare_models(a, b, batches=batches, threads=args.threads, seconds=secs,
                                 labels=(a.name, b.name))
            print(f"{name}: {time.time() - t0:.0f} s, load average {load:.1f}", flush=True)
            for sp in rep.speedups:
                print(f"  batch {sp.batch}: {sp.speedup:.2f}x [{sp.ci[0]:.2f}, {sp.ci[1]:.2f}], "
                      f"MACs {sp.theoretical:.2f}x, realized {100 * sp.realized:.0f}%", flush=True)
            doc = rep.to_dict()
            doc["benchmark"] = {"name": name, "load_average_1min_at_start": load}
            slug = name.split(" vs ")[0].split()[0].lower().replace(".onnx", "").replace("-", "")
            slug += "_" + name.split(" vs ")[1].split()[0].replace(".", "").lower()
            (out / f"profile_{slug}.json").write_text(json.dumps(doc, indent=2))
            results.append((name, rep))

    m = results[0][1].before.machine
    lines = [f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (shared with other jobs), "
             f"onnxruntime {m['onnxruntime']} CPUExecutionProvider, intra-op threads {args.threads}, "
             f"{m['date'][:10]}.", "",
             "| pair | batch | MACs | p50 ms | items/s | speedup [95% CI] | MAC speedup | realized | pairs / sessions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rep in results:
        lines += row(name, rep)
    lines += ["", f"Time by op type (ORT profiler, ms per run at batch {results[0][1].before.ops.batch}, "
                  "optimized graph):", "",
              "| pair | op | nodes | before ms | after ms | op speedup |", "|---|---|---|---|---|---|"]
    for name, rep in results:
        lines += ops_rows(name, rep)
    lines += ["", "| model | params | weight bytes | file bytes | peak RSS (child) | session adds |",
              "|---|---|---|---|---|---|"]
    seen = set()
    for _, rep in results:
        for p in (rep.before, rep.after):
            if p.model in seen:
                continue
            seen.add(p.model)
            lines.append(f"| {p.model} | {human(p.costs.params)} | {nbytes(p.costs.weight_bytes)} | "
                         f"{nbytes(p.costs.file_bytes)} | {nbytes(p.memory.peak_rss_bytes)} | "
                         f"{nbytes(p.memory.session_bytes)} |")
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
