"""Channel rounding per target: ONNX Runtime CPU vs OpenVINO CPU, side by side.

Two parts:

1. `sweep`: the channel block of each CPU runtime, by measurement. A two-layer conv chain
   (x -> Conv(C->w) -> ReLU -> Conv(w->C)) timed at every width w in a range, on ORT CPU and
   OpenVINO CPU (fp32), widths interleaved round-robin; the widths that run faster than a
   narrower one, and w per millisecond, show where each runtime's blocks are.
2. `zoo`: six torchvision models at channels.ratio 0.3 and 0.5, pruned with round=1, round=auto
   for each target (ort-cpu, openvino-cpu) and round=measure on each target; every variant timed
   against the original on both runtimes (round-robin in one process, batch 1 and 8), speedup
   and realized speedup (speedup / MAC ratio); and where round=measure picked different widths
   on the two runtimes.

Environment (torchvision does not import beside the system torch 2.13.0):

    python3 -m venv /work/venvs/tv && /work/venvs/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        onnx onnxruntime==1.32.0 onnx-graphsurgeon click rich scipy openvino==2026.4.1
    PYTHONPATH=. /work/venvs/tv/bin/python benchmarks/runtimes.py --out runtimes.json
    /work/venvs/tv/bin/python benchmarks/runtimes.py --render runtimes.json      # BENCHMARKS.md tables
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from prunec.graph.costs import analyze_costs  # noqa: E402
from prunec.passes import PassContext, PassManager, build_passes  # noqa: E402
from prunec.runtime.blocks import channel_multiple  # noqa: E402
from prunec.runtime.runtimes import get_runtime  # noqa: E402
from prunec.runtime.target import Target  # noqa: E402

ZOO6 = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "googlenet")


def targets(threads: int) -> dict[str, Target]:
    return {"ort-cpu": Target("ort", threads=threads), "openvino-cpu": Target("openvino", threads=threads)}


#: Which statistic the tables use. The machine this was measured on is shared (load average
#: about 10 on 2 cores from other jobs): a run longer than the scheduler's time slice gets
#: preempted and waits, so wall-clock times inflate long runs far more than short ones (even
#: the fastest of 31 runs read ResNet-18 at 2.3x its MAC-predicted speedup). With one intra-op
#: thread the run executes on the calling thread, and the process's CPU time per run
#: (time.process_time) does not count the time it waits for a core. Wall-clock min and median
#: are in the JSON too.
STAT = "cpu_median"


def round_robin(sessions: dict[str, object], feeds: dict, runs: int, gap: float) -> dict[str, dict]:
    """{"cpu_median", "cpu_min", "min", "median"} ms per session (CPU time of the process, wall
    clock), runs alternated (order reversed every other round)."""
    for s in sessions.values():
        s.infer(feeds)
    times = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    keys = list(sessions)
    for i in range(runs):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            time.sleep(gap)
            c0, t0 = time.process_time(), time.perf_counter()
            sessions[k].infer(feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: {"min": min(v), "median": statistics.median(v), "cpu_min": min(cpu[k]),
                "cpu_median": statistics.median(cpu[k])} for k, v in times.items()}


# --- part 1: width sweep ---------------------------------------------------------------------

def chain(c: int, w: int, k: int, hw: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    pad = [k // 2] * 4
    inits = [numpy_helper.from_array((rng.standard_normal((w, c, k, k)) * 0.05).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((c, w, k, k)) * 0.05).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=pad, name="conv_a"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=pad, name="conv_b")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def sweep(args) -> list[dict]:
    rows = []
    configs = [(64, 3, 56), (128, 1, 28)]
    widths = list(range(args.sweep_lo, args.sweep_hi + 1))
    for c, k, hw in configs:
        feeds = {"x": np.random.default_rng(0).standard_normal((1, c, hw, hw)).astype(np.float32)}
        for key, t in targets(args.threads).items():
            rt = get_runtime(t.runtime)
            sessions = {w: rt.open(chain(c, w, k, hw), t, shapes={"x": (1, c, hw, hw)}) for w in widths}
            ms = round_robin(sessions, feeds, args.sweep_runs, gap=0.002)
            for s in sessions.values():
                s.close()
            rows.append({"config": f"{k}x{k} conv, C={c}, {hw}x{hw}", "target": key,
                         "ms": {str(w): v[STAT] for w, v in ms.items()},
                         "wall_min_ms": {str(w): v["min"] for w, v in ms.items()}})
            print(json.dumps(rows[-1])[:300], flush=True)
    return rows


# --- part 2: zoo -------------------------------------------------------------------------------

def prune(model: onnx.ModelProto, ratio: float, rnd: str, target: Target):
    passes = build_passes(["channels"], {"channels": {"ratio": str(ratio), "round": rnd}})
    t0 = time.perf_counter()
    out, rep = PassManager(passes, ctx=PassContext(target=target)).run(model)
    d = rep.passes[0].result.details
    return out, {"prune_s": time.perf_counter() - t0, "round": d["round"], "target": d["target"],
                 "macs": rep.after.macs, "measured": d.get("measured_widths", {}),
                 "kept": {g["id"]: g["kept"] for g in d["group_table"] if not g["frozen"]}}


def bench_zoo(args) -> list[dict]:
    import torch

    from channels import calibrate_bn, export, zoo

    all_models = zoo()
    tg = targets(args.threads)
    rows = args.results.setdefault("zoo", [])  # saved after every row
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = export(calibrate_bn(all_models[name](), args.size), args.size)
        base_macs = analyze_costs(base).macs
        for ratio in args.ratios:
            variants, info = {}, {}
            specs = {"round1": ("1", tg["ort-cpu"]), "auto-ort": ("auto", tg["ort-cpu"]),
                     "auto-ov": ("auto", tg["openvino-cpu"]), "measure-ort": ("measure", tg["ort-cpu"]),
                     "measure-ov": ("measure", tg["openvino-cpu"])}
            for vname, (rnd, t) in specs.items():
                out, meta = prune(base, ratio, rnd, t)
                same = next((v for v, m in variants.items() if info[v]["kept"] == meta["kept"]), None)
                meta["same_as"] = same
                info[vname] = meta
                if same is None:
                    variants[vname] = out
            x = {"input": np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)}
            timing = {}
            for key, t in tg.items():
                rt = get_runtime(t.runtime)
                for batch, runs in ((1, args.runs1), (8, args.runs8)):
                    feeds = {"input": np.repeat(x["input"], batch, axis=0)}
                    shapes = {"input": feeds["input"].shape}
                    sess = {"original": rt.open(base, t, shapes=shapes)}
                    sess.update({v: rt.open(m, t, shapes=shapes) for v, m in variants.items()})
                    ms = round_robin(sess, feeds, runs, gap=args.gap)
                    for s in sess.values():
                        s.close()
                    timing[f"{key}/b{batch}"] = ms
            row = {"model": name, "ratio": ratio, "macs": base_macs, "variants": {}}
            for vname, meta in info.items():
                src = meta["same_as"] or vname
                v = {k: meta[k] for k in ("prune_s", "round", "target", "macs", "same_as")}
                v["macs_kept"] = meta["macs"] / base_macs
                v["measured"] = meta["measured"]
                for tk, both in timing.items():
                    ms = {k: x[STAT] for k, x in both.items()}
                    v[f"{tk}_ms"] = ms[src]
                    v[f"{tk}_orig_ms"] = ms["original"]
                    v[f"{tk}_speedup"] = ms["original"] / ms[src]
                    v[f"{tk}_realized"] = (ms["original"] / ms[src]) / (base_macs / meta["macs"])
                    v[f"{tk}_wall_min_speedup"] = both["original"]["min"] / both[src]["min"]
                    v[f"{tk}_wall_median_speedup"] = both["original"]["median"] / both[src]["median"]
                row["variants"][vname] = v
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "ratio")} |
                             {v: {k: round(x, 3) for k, x in d.items() if k.endswith("speedup")}
                              for v, d in row["variants"].items()}), flush=True)
            Path(args.out).write_text(json.dumps(args.results, indent=1))
    return rows


# --- rendering ----------------------------------------------------------------------------------

def render(doc: dict) -> str:
    lines = [f"Machine: {doc['machine']}, {doc['threads']} threads, onnxruntime {doc['onnxruntime']}, "
             f"openvino {doc['openvino']}, {doc['date']}.", ""]
    if doc.get("sweep"):
        lines += [f"Width sweep ({STAT} ms: process CPU time per run, median; a `*` marks a width faster than the "
                  "width just below it):",
                  ""]
        for r in doc["sweep"]:
            ms = {int(k): v for k, v in r["ms"].items()}
            ws = sorted(ms)
            faster = [w for a, w in zip(ws, ws[1:]) if ms[w] < ms[a] * 0.97]
            eff = sorted(ws, key=lambda w: -w / ms[w])[:4]
            cells = " ".join(f"{w}:{ms[w]:.2f}{'*' if w in faster else ''}" for w in ws)
            lines.append(f"- {r['config']}, **{r['target']}**: widths faster than the one below: "
                         f"{', '.join(map(str, faster)) or 'none'}; most channels per ms: {', '.join(map(str, eff))}")
            lines.append(f"  <details><summary>all widths</summary>{cells}</details>")
        lines.append("")
    if doc.get("zoo"):
        lines += [f"Latency: {STAT} (process CPU time per run, one intra-op thread; see STAT in the script); "
                  "speedup = original / variant.", "","| model | ratio | variant | MACs kept | ORT b1 ms (orig) | ORT b1 speedup | ORT b8 speedup "
                  "| OV b1 ms (orig) | OV b1 speedup | OV b8 speedup | ORT b1 real/theo | OV b1 real/theo |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in doc["zoo"]:
            for vname, v in row["variants"].items():
                note = f" (= {v['same_as']})" if v["same_as"] else ""
                lines.append(
                    f"| {row['model']} | {row['ratio']} | {vname}{note} | {v['macs_kept']:.3f} | "
                    f"{v['ort-cpu/b1_ms']:.2f} ({v['ort-cpu/b1_orig_ms']:.2f}) | {v['ort-cpu/b1_speedup']:.2f} | "
                    f"{v['ort-cpu/b8_speedup']:.2f} | {v['openvino-cpu/b1_ms']:.2f} ({v['openvino-cpu/b1_orig_ms']:.2f}) | "
                    f"{v['openvino-cpu/b1_speedup']:.2f} | {v['openvino-cpu/b8_speedup']:.2f} | "
                    f"{v['ort-cpu/b1_realized']:.2f} | {v['openvino-cpu/b1_realized']:.2f} |")
        lines += ["", "Where round=measure chose different widths on the two runtimes (group: nominal -> ORT, OpenVINO):", ""]
        for row in doc["zoo"]:
            mo, mv = row["variants"]["measure-ort"]["measured"], row["variants"]["measure-ov"]["measured"]
            diff = [f"`{g}` {mo[g]['nominal']} -> {mo[g]['chosen']}, {mv[g]['chosen']}"
                    for g in mo if g in mv and mo[g]["chosen"] != mv[g]["chosen"]]
            same = sum(1 for g in mo if g in mv and mo[g]["chosen"] == mv[g]["chosen"])
            lines.append(f"- {row['model']} {row['ratio']}: {same} groups alike; "
                         f"{'; '.join(diff) if diff else 'no difference'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="sweep,zoo")
    ap.add_argument("--models", default=",".join(ZOO6))
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs1", type=int, default=15)
    ap.add_argument("--runs8", type=int, default=5)
    ap.add_argument("--gap", type=float, default=0.01, help="idle seconds before each timed run")
    ap.add_argument("--sweep-lo", type=int, default=40)
    ap.add_argument("--sweep-hi", type=int, default=72)
    ap.add_argument("--sweep-runs", type=int, default=25)
    ap.add_argument("--out", default="runtimes.json")
    ap.add_argument("--render", default=None, metavar="RESULTS.json")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    sys.path.insert(0, str(HERE))
    import onnxruntime as ort
    import openvino as ov

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.results = {"machine": f"{cpu}, {os.cpu_count()} logical CPUs", "threads": args.threads,
                    "onnxruntime": ort.__version__, "openvino": ov.__version__, "date": time.strftime("%Y-%m-%d"),
                    "blocks": {k: channel_multiple(k) for k in ("ort-cpu", "openvino-cpu")}}
    parts = args.part.split(",")
    if "sweep" in parts:
        args.results["sweep"] = sweep(args)
        Path(args.out).write_text(json.dumps(args.results, indent=1))
    if "zoo" in parts:
        bench_zoo(args)
        Path(args.out).write_text(json.dumps(args.results, indent=1))
    print(render(args.results))


if __name__ == "__main__":
    main()
