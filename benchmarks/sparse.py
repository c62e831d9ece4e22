"""Sparse weights on ONNX Runtime CPU: what storage and execution paths actually deliver.

Run: PYTHONPATH=. python benchmarks/sparse.py [--quick] [--threads 2] [--out results.json]

1. Facts about ONNX Runtime, checked: does it densify sparse initializers at load (resident
   memory and latency of the same model stored dense vs sparse)? Does com.microsoft
   SparseToDenseMatMul accept a sparse initializer, and a sparse graph input bound at run time?
2. One Gemm 4096x4096 at batch 1 and 64, sparsity 50..98%: dense vs every sparse path
   (sparse initializer in stock ORT, SparseToDenseMatMul with a bound CSR input, prunec's scipy
   CSR custom op), file sizes, output error. All timed interleaved in one process, same threads.
3. ResNet-50 and a BERT-base-size encoder (random weights) through prunec's own passes:
   `sparsity` + `csr` (storage, and kernel=scipy chosen per layer by measurement), and `2to4`.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunec.graph.verify import deviation  # noqa: E402
from prunec.report.sparse import NOISE  # noqa: E402
from prunec.passes import PassContext, PassManager, build_passes  # noqa: E402
from prunec.runtime import sparse_ops  # noqa: E402
from prunec.runtime.session import make_session  # noqa: E402
from prunec.runtime.timing import interleaved_samples  # noqa: E402


def interleaved_ms(runners, *, runs: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per runner; the minimum is kept too (under load it is the steadier estimate)."""
    samples = interleaved_samples(runners, runs=runs, warmup=warmup)
    LAST_MIN.clear()
    LAST_MIN.update({k: float(np.min(v)) for k, v in samples.items()})
    return {k: float(np.median(v)) for k, v in samples.items()}


LAST_MIN: dict[str, float] = {}

def _session(model, threads=None):
    """A session that does not spin-wait: with sessions interleaved on 2 shared cores, one
    session's spinning pool would otherwise steal the cores from the next one's run."""
    return make_session(model, threads=threads, spin=False)


SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def apply(model: onnx.ModelProto, names: list[str], options: dict, shapes: dict | None = None):
    """Run prunec passes (verified after each, as `prunec run` does)."""
    return PassManager(build_passes(names, options), ctx=PassContext(input_shapes=shapes or {})).run(model)


def nbytes_file(model: onnx.ModelProto) -> int:
    return model.ByteSize()


# ------------------------------------------------------------------------------- 1. facts

def gemm_model(w_nk: np.ndarray, b: np.ndarray | None = None) -> onnx.ModelProto:
    n, k = w_nk.shape
    inits = [numpy_helper.from_array(w_nk, "W")]
    ins = ["x", "W"]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "B"))
        ins.append("B")
    g = helper.make_graph([helper.make_node("Gemm", ins, ["y"], name="fc", transB=1)], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(path: str) -> None:
    """(subprocess) resident memory growth from creating a session on `path`."""
    before = _rss_mb()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.ones((1, 4096), np.float32)})
    print(json.dumps({"rss_growth_mb": _rss_mb() - before}))


def _profiled_kernels(path: Path, prefix: Path) -> list[str]:
    """The kernels ONNX Runtime ran for a model, from its profiler: op and provider."""
    s = make_session(str(path), threads=1, profile_prefix=str(prefix))
    s.run(None, {"x": np.ones((1, 4096), np.float32)})
    events = json.loads(Path(s.end_profiling()).read_text())
    return sorted({f"{e['args']['op_name']} on {e['args'].get('provider', '?')}"
                   for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})})


def facts(tmp: Path, threads: int) -> dict:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096)).astype(np.float32)
    w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
    dense = gemm_model(w)
    sparse, _ = apply(dense, ["csr"], {})
    paths = {}
    for name, m in (("dense", dense), ("sparse", sparse)):
        paths[name] = tmp / f"fact_{name}.onnx"
        onnx.save(m, paths[name])
    out: dict = {"file_mb": {k: p.stat().st_size / 2**20 for k, p in paths.items()}}
    for name, p in paths.items():
        r = subprocess.run([sys.executable, __file__, "--_rss", str(p)], capture_output=True, text=True)
        out[f"rss_growth_mb_{name}"] = json.loads(r.stdout.strip().splitlines()[-1])["rss_growth_mb"]
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    sd, ss = (_session(str(p), threads=threads) for p in paths.values())
    out["latency_ms_batch1"] = interleaved_ms({"dense": lambda: sd.run(None, {"x": x}),
                                               "sparse_initializer": lambda: ss.run(None, {"x": x})}, runs=30)
    out["latency_min_ms_batch1"] = dict(LAST_MIN)
    out["kernels"] = {name: _profiled_kernels(p, tmp / f"prof_{name}") for name, p in paths.items()}
    # SparseToDenseMatMul fed by a sparse initializer.
    flat = w.reshape(-1)
    idx = np.flatnonzero(flat)
    g = helper.make_graph([helper.make_node("SparseToDenseMatMul", ["W", "x"], ["y"], domain="com.microsoft",
                                            transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4096])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096, "batch"])])
    g.sparse_initializer.append(helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], "W"),
                                                          numpy_helper.from_array(idx.astype(np.int64), "W_i"),
                                                          [4096, 4096]))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        out["contrib_with_sparse_initializer"] = "loads"
    except Exception as exc:  # ORT raises its own C++ exception types
        out["contrib_with_sparse_initializer"] = "fails: " + " ".join(str(exc).split())[:200]
    return out


# ------------------------------------------------------------------------------- 2. one Gemm

def contrib_session(n: int, k: int, threads: int):
    """Y^T = SparseToDenseMatMul(W_sparse[N,K], X[B,K], transB=1), then Transpose: W bound at run time."""
    nodes = [helper.make_node("SparseToDenseMatMul", ["W", "x"], ["yt"], domain="com.microsoft", transB=1),
             helper.make_node("Transpose", ["yt"], ["y"], perm=[1, 0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k]),
                                       helper.make_sparse_tensor_value_info("W", TensorProto.FLOAT, [n, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return _session(m, threads=threads)


def gemm_sweep(sparsities, batches, threads: int, runs: int) -> list[dict]:
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n = k = 4096
    w0 = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    base = gemm_model(w0, b)
    cpu = ort.OrtDevice.make("cpu", 0)
    rows = []
    for s in sparsities:
        pruned, _ = apply(base, ["sparsity"], {"sparsity": {"ratio": s}})
        stored, _ = apply(pruned, ["csr"], {"csr": {"threshold": 0.0}})
        wp = numpy_helper.to_array(pruned.graph.initializer[0])
        csr = sp.csr_matrix(wp)
        csr_op = None
        if sparse_ops.available():
            # Force the custom op (no measurement) by building the op model directly, for the sweep.
            from prunec.passes.csr import _key, _single_layer_model
            arrays = (csr.data.astype(np.float32), csr.indices.astype(np.int32), csr.indptr.astype(np.int32))
            csr_op = _single_layer_model(None, arrays + (_key(arrays),), "batch")
        st = ort.SparseTensor.sparse_csr_from_numpy(np.array([n, k], np.int64), csr.data,
                                                    csr.indices.astype(np.int64), csr.indptr.astype(np.int64), cpu)
        wv = ort.OrtValue.ort_value_from_sparse_tensor(st)
        sess = {"dense": _session(pruned, threads=threads), "sparse_init": _session(stored, threads=threads),
                "contrib": contrib_session(n, k, threads)}
        if csr_op is not None:
            # The op model has no bias: it is added in numpy for the error check; the timing leaves
            # out a 4096-element add, negligible against the product.
            sess["scipy_op"] = _session(csr_op, threads=threads)
        for batch in batches:
            x = rng.standard_normal((batch, k)).astype(np.float32)
            xv = ort.OrtValue.ortvalue_from_numpy(x)
            ref_dense = x @ w0.T + b
            run = {"dense": lambda: sess["dense"].run(None, {"x": x}),
                   "sparse_init": lambda: sess["sparse_init"].run(None, {"x": x}),
                   "contrib": lambda: sess["contrib"].run_with_ort_values(["y"], {"W": wv, "x": xv}),
                   "scipy_raw": lambda: csr @ x.T}
            if "scipy_op" in sess:
                run["scipy_op"] = lambda: sess["scipy_op"].run(None, {"x": x})
            # Batch-1 calls take milliseconds: afford more of them against the machine's noise.
            ms = interleaved_ms(run, runs=runs * 4 if batch == 1 else runs)
            y_dense = sess["dense"].run(None, {"x": x})[0]
            outs = {"sparse_init": sess["sparse_init"].run(None, {"x": x})[0],
                    "contrib": sess["contrib"].run_with_ort_values(["y"], {"W": wv, "x": xv})[0].numpy() + b}
            if "scipy_op" in sess:
                outs["scipy_op"] = sess["scipy_op"].run(None, {"x": x})[0] + b
            row = {"sparsity": s, "batch": batch, "ms": ms, "min_ms": dict(LAST_MIN),
                   "speedup": {k2: ms["dense"] / v for k2, v in ms.items() if k2 != "dense"},
                   "rel_err_vs_pruned_dense": {k2: deviation(y_dense, v).rel for k2, v in outs.items()},
                   "rel_err_pruned_vs_unpruned": deviation(ref_dense, y_dense).rel,
                   "file_bytes": {"dense": pruned.ByteSize(), "sparse_init": stored.ByteSize(),
                                  "csr_op": csr_op.ByteSize() if csr_op is not None else None}}
            rows.append(row)
            log(f"gemm s={s:.2f} b={batch}: " + ", ".join(f"{k2} {v:.3f}ms" for k2, v in ms.items())
                + f" | file sparse/dense {row['file_bytes']['sparse_init'] / row['file_bytes']['dense']:.3f}")
    return rows


def gemm_2to4() -> dict:
    """Output error of the 2:4 Gemm 4096x4096 against dense, batch 64."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((4096, 4096)) / 64).astype(np.float32)
    base = gemm_model(w0, rng.standard_normal(4096).astype(np.float32))
    m24, rep = apply(base, ["2to4"], {})
    x = rng.standard_normal((64, 4096)).astype(np.float32)
    d = deviation(_session(base).run(None, {"x": x})[0], _session(m24).run(None, {"x": x})[0])
    return {"sparsity": rep.passes[0].result.details["sparsity"], "rel_err": d.rel, "cosine": d.cosine}


# ------------------------------------------------------------------------------- 3. models

def resnet50():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = mid * 4
            self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
            self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
            self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            return torch.relu(self.b3(self.c3(y)) + self.down(x))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(blocks):
                    layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                    cin = mid * 4
            self.body = nn.Sequential(*layers)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(self.stem(x)), 1), 1))

    return ResNet50(), (torch.randn(1, 3, 224, 224),), ["images"]


def bert_encoder(layers: int, seq: int):
    """BERT-base-size post-LayerNorm encoder (hidden 768, 12 heads, FFN 3072), written out so the
    export is plain MatMul/Softmax (torch's fused TransformerEncoder fast path does not export)."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d=768, heads=12, ff=3072):
            super().__init__()
            self.h, self.dk = heads, d // heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

        def forward(self, x):
            b, t, d = x.shape
            split = lambda y: y.view(b, t, self.h, self.dk).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            a = torch.softmax(q @ k.transpose(-1, -2) / self.dk ** 0.5, dim=-1) @ v
            x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, d)))
            return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    return nn.Sequential(*[Layer() for _ in range(layers)]), (torch.randn(1, seq, 768),), ["hidden"]


def export(build, path: Path) -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    module, args, names = build()
    module.eval()
    # Random init keeps BN statistics trivial; give them spread so folding is not a no-op.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    return onnx.load(str(path))


def model_sweep(name: str, model: onnx.ModelProto, sparsities, threads: int, runs: int, kernel_runs: int) -> dict:
    out: dict = {"name": name, "file_bytes_dense": model.ByteSize(), "rows": []}
    t0 = time.perf_counter()
    base_sess = _session(model, threads=threads)
    from prunec.runtime.inputs import random_inputs, resolve_input_shapes
    feeds = random_inputs(model, resolve_input_shapes(model), seed=0)
    ref = base_sess.run(None, feeds)[0]
    m24, rep24 = apply(model, ["2to4"], {})
    y24 = _session(m24, threads=threads).run(None, feeds)[0]
    d24 = deviation(ref, y24)
    out["2to4"] = {"layers": rep24.passes[0].result.details["layers"],
                   "skipped": len(rep24.passes[0].result.skipped),
                   "sparsity": rep24.passes[0].result.details["sparsity"],
                   "rel_err": d24.rel, "cosine": d24.cosine}
    log(f"{name} 2:4: {out['2to4']}")
    for s in sparsities:
        pruned, _ = apply(model, ["sparsity"], {"sparsity": {"ratio": s}})
        stored, _ = apply(pruned, ["csr"], {})
        sess = {"dense": _session(pruned, threads=threads), "sparse_init": _session(stored, threads=threads)}
        kern_info = None
        if sparse_ops.available() and kernel_runs:
            kern, krep = apply(pruned, ["csr"], {"csr": {"kernel": "scipy", "runs": kernel_runs,
                                                         "threads": threads}})
            t = krep.passes[0].result.details["timings"]
            kern_info = {"candidates": len(t), "sparse_layers": sum(x["chosen"] == "sparse" for x in t),
                         "layer_timings": t}
            if kern_info["sparse_layers"]:
                sess["scipy_auto"] = _session(kern, threads=threads)
        run = {k: (lambda s_=v: s_.run(None, feeds)) for k, v in sess.items()}
        ms = interleaved_ms(run, runs=runs, warmup=1)
        y = sess["dense"].run(None, feeds)[0]
        ys = sess["sparse_init"].run(None, feeds)[0]
        row = {"sparsity": s, "ms": ms, "min_ms": dict(LAST_MIN), "speedup": {k: ms["dense"] / v for k, v in ms.items() if k != "dense"},
               "file_bytes": {"dense": pruned.ByteSize(), "sparse_init": stored.ByteSize()},
               "rel_err_pruned_vs_unpruned": deviation(ref, y).rel,
               "cos_pruned_vs_unpruned": deviation(ref, y).cosine,
               "rel_err_sparse_init_vs_pruned": deviation(y, ys).rel,
               "scipy_kernel": kern_info}
        out["rows"].append(row)
        log(f"{name} s={s:.2f}: " + ", ".join(f"{k} {v:.1f}ms" for k, v in ms.items())
            + f" | file {row['file_bytes']['sparse_init'] / row['file_bytes']['dense']:.3f}x"
            + (f" | scipy kernel won {kern_info['sparse_layers']}/{kern_info['candidates']} layers" if kern_info else ""))
    out["seconds"] = time.perf_counter() - t0
    return out


PATH_LABELS = {"sparse_init": "sparse initializer (stock ORT)",
               "contrib": "SparseToDenseMatMul, CSR bound at run time",
               "scipy_op": "prunec scipy CSR custom op (PyOp)",
               "scipy_raw": "scipy CSR @ X, no ORT (bound)",
               "scipy_auto": "csr kernel=scipy, per-layer choice"}


def faster(r: dict, path: str) -> bool:
    """Faster than dense beyond noise: median more than 5% faster, and the minimum faster too."""
    return (r["speedup"].get(path, 0) > 1 + NOISE
            and r.get("min_ms", {}).get(path, np.inf) < r.get("min_ms", {}).get("dense", 0))


def _min_ratio(r: dict, path: str) -> str:
    mins = r.get("min_ms", {})
    return f"{mins['dense'] / mins[path]:.2f}x" if path in mins and mins.get(path) else "?"


def crossover(rows: list[dict], path: str) -> float | None:
    """Lowest swept sparsity from which `path` is faster than dense at every higher one."""
    rows = sorted(rows, key=lambda r: r["sparsity"])
    best = None
    for r in reversed(rows):
        if faster(r, path):
            best = r["sparsity"]
        else:
            break
    return best


def to_markdown(res: dict) -> str:
    """The BENCHMARKS.md tables for a result document."""
    m = res["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), onnxruntime {m['onnxruntime']}, "
           f"CPUExecutionProvider, {res['threads']} intra-op threads, no spin-waiting, {m['date']}. "
           "Latency = median of interleaved runs; (Nx) = dense/path on medians, min = the same on the fastest run of "
           "each (steadier when other jobs load the machine)."]
    if "facts" in res:
        f = res["facts"]
        out += ["", "| check | result |", "|---|---|",
                f"| file, 4096x4096 Gemm at 90% | dense {f['file_mb']['dense']:.1f} MiB, sparse initializer "
                f"{f['file_mb']['sparse']:.1f} MiB ({f['file_mb']['sparse'] / f['file_mb']['dense']:.3f}x) |",
                f"| resident memory growth after session load | dense {f['rss_growth_mb_dense']:.0f} MiB, sparse file "
                f"{f['rss_growth_mb_sparse']:.0f} MiB |",
                f"| latency batch 1 (median / min) | dense {f['latency_ms_batch1']['dense']:.2f} / "
                f"{f['latency_min_ms_batch1']['dense']:.2f} ms, sparse initializer "
                f"{f['latency_ms_batch1']['sparse_initializer']:.2f} / {f['latency_min_ms_batch1']['sparse_initializer']:.2f} ms |",
                f"| SparseToDenseMatMul fed by a sparse initializer | {f['contrib_with_sparse_initializer']} |"]
        if "kernels" in f:
            out.insert(-1, f"| kernels run (ORT profiler) | dense file: {'; '.join(f['kernels']['dense'])}; "
                           f"sparse file: {'; '.join(f['kernels']['sparse'])} |")
    if "gemm" in res:
        paths = [p for p in ("sparse_init", "contrib", "scipy_op", "scipy_raw") if p in res["gemm"][0]["ms"]]
        out += ["", "Gemm 4096x4096 (+bias), speedup = dense ms / path ms (>1: faster than dense):", "",
                "| sparsity | batch | dense ms | " + " | ".join(PATH_LABELS[p] for p in paths)
                + " | file: sparse init / dense | file: CSR op / dense | rel. error, pruned vs unpruned |",
                "|---" * (len(paths) + 6) + "|"]
        for r in res["gemm"]:
            fb = r["file_bytes"]
            out.append(f"| {r['sparsity']:.0%} | {r['batch']} | {r['ms']['dense']:.2f} | "
                       + " | ".join(f"{r['ms'][p]:.2f} ms ({r['speedup'][p]:.2f}x; min {_min_ratio(r, p)})"
                                    for p in paths)
                       + f" | {fb['sparse_init'] / fb['dense']:.3f}x | "
                       + (f"{fb['csr_op'] / fb['dense']:.3f}x" if fb.get("csr_op") else "n/a")
                       + f" | {r['rel_err_pruned_vs_unpruned']:.3f} |")
        out.append("")
        for b in sorted({r["batch"] for r in res["gemm"]}):
            rows = [r for r in res["gemm"] if r["batch"] == b]
            parts = ["sparse initializer: none by construction (ONNX Runtime runs the same dense "
                     "kernel; its ratios above show the noise level)"]
            for p in paths[1:]:
                c = crossover(rows, p)
                parts.append(f"{PATH_LABELS[p]}: " + (f"from {c:.0%}" if c is not None else "none in the sweep"))
            out.append(f"- Crossover at batch {b}: " + "; ".join(parts) + ".")
    if "gemm_2to4" in res:
        g = res["gemm_2to4"]
        out += ["", f"2:4 on the Gemm 4096x4096 (batch 64): sparsity {g['sparsity']:.0%}, output rel. error "
                f"{g['rel_err']:.3f}, cosine {g['cosine']:.4f} vs dense."]
    for key in ("resnet50", "bert"):
        if key not in res:
            continue
        r = res[key]
        t = r["2to4"]
        out += ["", f"{r['name']} (random weights): dense file {r['file_bytes_dense'] / 2**20:.1f} MiB. "
                f"2:4 on {t['layers']} layers ({t['skipped']} skipped): output rel. error {t['rel_err']:.3f}, "
                f"cosine {t['cosine']:.4f} vs dense.", "",
                "| sparsity | dense ms | sparse init ms | csr kernel=scipy | file sparse/dense | "
                "rel. error pruned vs unpruned (cos) | sparse init vs pruned dense |",
                "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            k = row.get("scipy_kernel")
            if k is None:
                kern = "not run"
            elif "scipy_auto" in row["ms"]:
                kern = (f"{k['sparse_layers']}/{k['candidates']} layers chosen; model {row['ms']['scipy_auto']:.1f} ms "
                        f"({row['speedup']['scipy_auto']:.2f}x; min {_min_ratio(row, 'scipy_auto')})")
            else:
                kern = f"0/{k['candidates']} layers faster: kept dense"
            fb = row["file_bytes"]
            out.append(f"| {row['sparsity']:.0%} | {row['ms']['dense']:.1f} | {row['ms']['sparse_init']:.1f} "
                       f"({row['speedup']['sparse_init']:.2f}x; min {_min_ratio(row, 'sparse_init')}) | {kern} | {fb['sparse_init'] / fb['dense']:.3f}x | "
                       f"{row['rel_err_pruned_vs_unpruned']:.3f} ({row['cos_pruned_vs_unpruned']:.3f}) | "
                       f"{row['rel_err_sparse_init_vs_pruned']:.1e} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, sparsities 50/90/98, BERT 2 layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--bert-layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: facts,gemm,gemm24,resnet,bert")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--markdown", default=None, metavar="JSON",
                    help="print the BENCHMARKS.md tables for a saved result file, run nothing")
    ap.add_argument("--_rss", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._rss:
        rss_child(a._rss)
        return
    if a.markdown:
        print(to_markdown(json.loads(Path(a.markdown).read_text())))
        return
    skip = set(filter(None, a.skip.split(",")))
    sparsities = (0.5, 0.9, 0.98) if a.quick else SPARSITIES
    runs = a.runs or (3 if a.quick else 7)
    # 12 layers x 6 sparsities does not fit the 10-minute budget on 2 shared cores; 4 layers of
    # BERT-base shape do (per-layer shapes, hence per-layer results, are BERT-base's).
    bert_layers = a.bert_layers or (2 if a.quick else 4)
    res: dict = {"machine": machine(), "threads": a.threads, "runs": runs, "sparsities": sparsities,
                 "scipy_kernel_available": sparse_ops.available()}
    log(json.dumps(res["machine"]))
    with tempfile.TemporaryDirectory(prefix="prunec-bench-") as d:
        tmp = Path(d)
        if "facts" not in skip:
            res["facts"] = facts(tmp, a.threads)
            log(f"facts: {res['facts']}")
        if "gemm" not in skip:
            res["gemm"] = gemm_sweep(sparsities, (1, 64), a.threads, 2 * runs + 1)
        if "gemm24" not in skip:
            res["gemm_2to4"] = gemm_2to4()
            log(f"gemm 2:4: {res['gemm_2to4']}")
        if "resnet" not in skip:
            m = export(resnet50, tmp / "resnet50.onnx")
            m, _ = apply(m, ["fold-bn"], {}) if any(n.op_type == "BatchNormalization" for n in m.graph.node) else (m, None)
            res["resnet50"] = model_sweep("resnet50", m, sparsities, a.threads, runs, kernel_runs=5)
        if "bert" not in skip:
            m = export(lambda: bert_encoder(bert_layers, a.seq), tmp / "bert.onnx")
            res["bert"] = model_sweep(f"bert-{bert_layers}L-seq{a.seq}", m, sparsities, a.threads, runs,
                                      kernel_runs=3)
            res["bert"]["layers"] = bert_layers
    text = json.dumps(res, indent=1, default=float)
    if a.out:
        Path(a.out).write_text(text)
    print(to_markdown(res))


if __name__ == "__main__":
    main()
