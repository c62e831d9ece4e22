"""GPU: fp16 dense vs channel-pruned (prunec's widths) vs 2:4 semi-structured sparse, end to end.

Runs on a CUDA machine with PyTorch alone (no torchvision, TensorRT, onnxruntime-gpu or
network): ResNet-50 (defined here, torchvision's layout) and a BERT-base-size encoder (12
layers, hidden 768, 12 heads, FFN 3072, sequence 128), fp16, batch 1 and 32. Variants:

- `dense`: the model as is (cuDNN convolutions, cuBLAS matmuls);
- `pruned-0.3`, `pruned-0.5`: the widths prunec keeps at channels.ratio 0.3 / 0.5 for target
  tensorrt-fp16 (round=auto: multiples of 8), read from `gpu_widths.json` (written on a CPU
  machine by `benchmarks/gpu_widths.py` from ONNX exports of these very definitions);
- `2:4`: every eligible weight masked 2:4 along its input dimension and stored with
  `torch.sparse.to_sparse_semi_structured` (cuSPARSELt where torch has it, else CUTLASS): all
  Linear layers of the encoder; ResNet-50's 1x1 convolutions and its classifier run as a
  channels-last matmul on the sparse weight (PyTorch has semi-structured kernels for matmul
  only, so 3x3 and 7x7 convolutions stay dense);
- `pruned-0.5+2:4`: both.

Timing: CUDA graphs where capture works (else eager, noted), all variants of one model and batch
size replayed round-robin, `--iters` timed replays each with CUDA events, median and IQR.
Per layer: every eligible layer timed alone at its real input shape, dense vs sparse, and
whether the conversion gave it a sparse kernel (a layer whose shape the kernels reject stays
dense, with the reason). The kernel names that ran in the 2:4 model come from torch.profiler.

Usage (on the GPU machine; $OUT is where results go):

    python benchmarks/gpu_sparse.py --out "$OUT"            # expected 1-3 min (not yet run on a GPU); cut off at --budget 280 s
    python benchmarks/gpu_sparse.py --dry-run --out /tmp/x  # CPU, tiny shapes, fp32: checks the script

Writes `gpu_sparse.json` and `gpu_sparse.md` (a markdown table) into --out. Each model runs in its
own process; one whose run fails (e.g. a CUDA graph capture that breaks the context) is run again
without CUDA graphs, and a failure is recorded under "errors" instead of costing the other model.
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

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
#: NVIDIA's published end-to-end speedups for 2:4 sparsity with TensorRT on Ampere (the range
#: the issue quotes: dense fp16/int8 vs sparse, whole networks such as ResNeXt and BERT).
PUBLISHED_2_4 = (1.3, 1.8)


# --- models ----------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3x3), widths given explicitly."""

    def __init__(self, cin: int, mid1: int, mid2: int, cout: int, stride: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.conv2 = nn.Conv2d(mid1, mid2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.conv3 = nn.Conv2d(mid2, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                           if downsample else None)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


RESNET50_BLOCKS = (3, 4, 6, 3)


def resnet50_widths() -> list[int]:
    """Output channels of every conv of ResNet-50 in execution order (stem, then per block
    conv1, conv2, conv3 and, for a stage's first block, downsample)."""
    widths = [64]
    for stage, n in enumerate(RESNET50_BLOCKS):
        planes = 64 * 2 ** stage
        for b in range(n):
            widths += [planes, planes, planes * 4] + ([planes * 4] if b == 0 else [])
    return widths


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's layout; `widths` (from resnet50_widths' order) sets every
    conv's output channels, so a pruned model is the same code."""

    def __init__(self, widths: list[int] | None = None, num_classes: int = 1000):
        super().__init__()
        w = list(widths or resnet50_widths())
        self.conv1 = nn.Conv2d(3, w[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        i, cin = 1, w[0]
        for stage, n in enumerate(RESNET50_BLOCKS):
            blocks = []
            for b in range(n):
                mid1, mid2, cout = w[i], w[i + 1], w[i + 2]
                i += 3
                if b == 0:
                    if w[i] != cout:
                        raise ValueError(f"stage {stage + 1}: downsample {w[i]} != conv3 {cout} (residual)")
                    i += 1
                blocks.append(Bottleneck(cin, mid1, mid2, cout, 2 if (b == 0 and stage > 0) else 1, b == 0))
                cin = cout
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class EncoderLayer(nn.Module):
    """Post-LN transformer encoder layer (BERT), explicit Linear layers so each can go sparse."""

    def __init__(self, hidden: int, heads: int, qk: int, v: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, qk)
        self.k = nn.Linear(hidden, qk)
        self.v = nn.Linear(hidden, v)
        self.o = nn.Linear(v, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.ffn1 = nn.Linear(hidden, ffn)
        self.ffn2 = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.heads
        q = self.q(x).reshape(b, s, h, -1).transpose(1, 2)
        k = self.k(x).reshape(b, s, h, -1).transpose(1, 2)
        v = self.v(x).reshape(b, s, h, -1).transpose(1, 2)
        if torch.onnx.is_in_onnx_export():  # plain ops for the exporter (and so for prunec)
            att = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v)
        x = self.ln1(x + self.o(att.transpose(1, 2).reshape(b, s, -1)))
        return self.ln2(x + self.ffn2(F.gelu(self.ffn1(x))))


def bert_widths(layers: int = 12, hidden: int = 768, ffn: int = 3072) -> list[int]:
    """Output features of every Linear in execution order (q, k, v, o, ffn1, ffn2 per layer)."""
    return [hidden, hidden, hidden, hidden, ffn, hidden] * layers


class Encoder(nn.Module):
    """BERT-base-size encoder on embeddings (input [batch, seq, hidden])."""

    def __init__(self, widths: list[int] | None = None, layers: int = 12, hidden: int = 768, heads: int = 12):
        super().__init__()
        w = list(widths or bert_widths(layers, hidden))
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, heads, w[6 * i], w[6 * i + 2], w[6 * i + 4]) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# --- 2:4 ---------------------------------------------------------------------------------------

def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive weights along the input (last) dimension."""
    out, cin = w.shape
    if cin % 4:
        raise ValueError(f"input dimension {cin} is not a multiple of 4")
    g = w.reshape(out, cin // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(out, cin)


class SparseLinear(nn.Module):
    """y = x @ W^T + b over the last dim, W stored 2:4 semi-structured (or dense, masked, with the
    reason, when the kernels reject it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str, try_sparse: bool):
        super().__init__()
        self.name = name
        masked = mask_2_4(weight.detach())
        self.sparse, self.reason = False, "not tried"
        w = masked
        if try_sparse:
            try:
                from torch.sparse import to_sparse_semi_structured

                w = to_sparse_semi_structured(masked)
                self.sparse, self.reason = True, type(w).__name__
            except Exception as exc:  # unsupported shape, dtype or device: stays dense, says why
                self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        y = F.linear(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return y.reshape(*shape[:-1], y.shape[-1])


class Conv1x1AsLinear(nn.Module):
    """A 1x1 (possibly strided) conv as a channels-last matmul, so a 2:4 weight can run sparse."""

    def __init__(self, conv: nn.Conv2d, name: str, try_sparse: bool):
        super().__init__()
        self.stride = conv.stride[0]
        self.lin = SparseLinear(conv.weight[:, :, 0, 0], conv.bias, name, try_sparse)

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        y = self.lin(x.permute(0, 2, 3, 1))  # NHWC view of a channels-last tensor: no copy
        return y.permute(0, 3, 1, 2)


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the conv before it (what an inference engine does)."""
    for mod in model.modules():
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Sequential) and len(child) == 2 and isinstance(child[1], nn.BatchNorm2d):
                setattr(mod, name, _fused(child[0], child[1]))
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        for c, b in pairs:
            if isinstance(getattr(mod, c, None), nn.Conv2d) and isinstance(getattr(mod, b, None), nn.BatchNorm2d):
                setattr(mod, c, _fused(getattr(mod, c), getattr(mod, b)))
                setattr(mod, b, nn.Identity())
    return model


def _fused(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=True).to(conv.weight.device, conv.weight.dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    out.weight.data = conv.weight * scale[:, None, None, None]
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    out.bias.data = (bias - bn.running_mean) * scale + bn.bias
    return out


def sparsify(model: nn.Module, try_sparse: bool) -> list[SparseLinear]:
    """Replace eligible layers by 2:4 versions in place; returns them (with sparse/why)."""
    done = []
    for mname, mod in list(model.named_modules()):
        for name, child in list(mod.named_children()):
            full = f"{mname}.{name}" if mname else name
            if isinstance(child, nn.Linear):
                new = SparseLinear(child.weight, child.bias, full, try_sparse)
                setattr(mod, name, new)
                done.append(new)
            elif isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and child.groups == 1:
                new = Conv1x1AsLinear(child, full, try_sparse)
                setattr(mod, name, new)
                done.append(new.lin)
    return done


# --- timing ------------------------------------------------------------------------------------

class Runner:
    """A model and its input, replayed through a CUDA graph when capture works."""

    def __init__(self, model: nn.Module, x: torch.Tensor, use_graph: bool):
        self.model, self.x, self.graph, self.note = model, x, None, "eager"
        with torch.inference_mode():
            for _ in range(3):
                model(x)
        if use_graph:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s), torch.inference_mode():
                    for _ in range(3):
                        model(x)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g), torch.inference_mode():
                    self.out = model(x)
                self.graph, self.note = g, "cuda graph"
            except Exception as exc:
                self.note = f"eager (graph capture failed: {type(exc).__name__})"
                torch.cuda.synchronize()

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self.model(self.x)


def time_round_robin(runners: dict, iters: int, cuda: bool) -> dict[str, dict]:
    """Median and quartiles (ms) per runner, runs interleaved round-robin (order alternating)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for i in range(iters):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runners[k]()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                runners[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
        out[k] = {"median_ms": statistics.median(v), "q1_ms": q[0], "q3_ms": q[2], "runs": len(v)}
    return out


def layer_times(layers: list[SparseLinear], inputs: dict[str, tuple], dtype, device, iters: int,
                cuda: bool) -> list[dict]:
    """Each eligible layer alone at its real input rows: dense masked weight vs its sparse weight."""
    rows, seen = [], {}
    for lay in layers:
        shape = inputs.get(lay.name)
        if shape is None:
            continue
        w = lay.weight
        dense_w = w.to_dense() if hasattr(w, "to_dense") and lay.sparse else w
        key = (tuple(dense_w.shape), shape, lay.sparse)
        if key not in seen:
            x = torch.randn(*shape, dtype=dtype, device=device)
            r = {"dense": (lambda x=x, d=dense_w: F.linear(x, d)),
                 "sparse": (lambda x=x, s=w: F.linear(x, s))}
            seen[key] = time_round_robin(r, iters, cuda)
        t = seen[key]
        rows.append({"layer": lay.name, "weight": list(dense_w.shape), "rows": shape[0], "sparse_kernel": lay.sparse,
                     "why": lay.reason, "dense_ms": t["dense"]["median_ms"], "sparse_ms": t["sparse"]["median_ms"],
                     "speedup": t["dense"]["median_ms"] / t["sparse"]["median_ms"]})
    return rows


def record_inputs(model: nn.Module, x: torch.Tensor, layers: list[SparseLinear]) -> dict[str, tuple]:
    """The 2-D input shape each SparseLinear sees in a forward pass."""
    shapes = {}

    def hook(name):
        def record(module, args):  # returns None: the input is left as it is
            shapes.setdefault(name, (int(args[0].numel() // args[0].shape[-1]), int(args[0].shape[-1])))
        return record

    hooks = [lay.register_forward_pre_hook(hook(lay.name)) for lay in layers]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def sparse_kernel_names(runner: Runner, cuda: bool) -> list[str]:
    """Distinct GPU kernel names with 'sparse' or 'cusparselt' in them, from one profiled run."""
    if not cuda:
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "sparse" in n.lower() or "cslt" in n.lower())[:20]


# --- the benchmark -------------------------------------------------------------------------------

def build(kind: str, widths: list[int] | None, small: bool):
    if kind == "resnet50":
        return ResNet50(widths)
    if small:
        return Encoder(widths, layers=2)
    return Encoder(widths)


def bench_model(kind: str, widths_doc: dict, batches: list[int], args, device, dtype, cuda: bool) -> dict:
    small = args.dry_run
    res = {"model": kind, "batches": {}}
    torch.manual_seed(0)
    variants: dict[str, nn.Module] = {"dense": build(kind, None, small)}
    for ratio, w in sorted(widths_doc.get(kind, {}).items()):
        if small and kind == "bert":
            w = w[: 6 * 2]
        variants[f"pruned-{ratio}"] = build(kind, w, small)
    for name, m in list(variants.items()):
        m = fold_bn(m.eval()).to(device=device, dtype=dtype)
        if kind == "resnet50":
            m = m.to(memory_format=torch.channels_last)
        variants[name] = m
    sparse_layers: dict[str, list[SparseLinear]] = {}
    for base in ("dense", "pruned-0.5"):
        if base not in variants:
            continue
        m = build(kind, None if base == "dense" else widths_doc[kind]["0.5"][: 12 if small and kind == "bert" else None],
                  small)
        m = fold_bn(m.eval()).to(device=device, dtype=dtype)
        if kind == "resnet50":
            m = m.to(memory_format=torch.channels_last)
        name = "2:4" if base == "dense" else "pruned-0.5+2:4"
        sparse_layers[name] = sparsify(m, try_sparse=cuda)
        variants[name] = m
    for b in batches:
        if kind == "resnet50":
            size = 64 if small else 224
            x = torch.randn(b, 3, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        else:
            x = torch.randn(b, 16 if small else 128, 768, device=device, dtype=dtype)
        runners = {k: Runner(m, x, use_graph=cuda and not args.no_graphs) for k, m in variants.items()}
        t = time_round_robin(runners, args.iters, cuda)
        dense = t["dense"]["median_ms"]
        entry = {"variants": {k: {**v, "speedup_vs_dense": dense / v["median_ms"], "mode": runners[k].note}
                              for k, v in t.items()}}
        # Check the variants compute what they should: 2:4 model vs its own masked-dense reference is
        # exact up to fp16 rounding; here we just require finite outputs of the right shape.
        with torch.inference_mode():
            for k, m in variants.items():
                y = m(x)
                if not torch.isfinite(y).all():
                    entry["variants"][k]["warning"] = "non-finite output"
        if "2:4" in variants:
            shapes = record_inputs(variants["2:4"], x, sparse_layers["2:4"])
            entry["layers"] = layer_times(sparse_layers["2:4"], shapes, dtype, device, max(10, args.iters // 4), cuda)
            entry["sparse_kernels"] = sparse_kernel_names(runners["2:4"], cuda)
        res["batches"][str(b)] = entry
        del runners
        if cuda:
            torch.cuda.empty_cache()
    res["sparse_layers"] = {k: {"eligible": len(v), "sparse": sum(lay.sparse for lay in v),
                                "dense_because": sorted({lay.reason for lay in v if not lay.sparse})[:5]}
                            for k, v in sparse_layers.items()}
    return res


def to_markdown(doc: dict) -> str:
    env = doc["env"]
    lines = [f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuSPARSELt "
             f"{env['cusparselt']}; {env['dtype']}; {doc['date']}; {env['mode']}.", "",
             "| model | batch | variant | median ms (IQR) | speedup vs dense | timing | sparse layers |",
             "|---|---:|---|---:|---:|---|---|"]
    for r in doc["models"]:
        for b, e in r["batches"].items():
            for k, v in e["variants"].items():
                sl = r["sparse_layers"].get(k)
                sparse = f"{sl['sparse']}/{sl['eligible']}" if sl else ""
                lines.append(f"| {r['model']} | {b} | {k} | {v['median_ms']:.3f} ({v['q1_ms']:.3f}-{v['q3_ms']:.3f}) "
                             f"| {v['speedup_vs_dense']:.2f}x | {v['mode']} | {sparse} |")
    lines += ["", f"Published end-to-end 2:4 speedups (TensorRT, Ampere): {PUBLISHED_2_4[0]}-{PUBLISHED_2_4[1]}x.", "",
              "| model | batch | layer | weight | rows | sparse kernel | dense ms | sparse ms | speedup |",
              "|---|---:|---|---|---:|---|---:|---:|---:|"]
    for r in doc["models"]:
        for b, e in r["batches"].items():
            for lay in e.get("layers", []):
                lines.append(f"| {r['model']} | {b} | {lay['layer']} | {lay['weight'][0]}x{lay['weight'][1]} | "
                             f"{lay['rows']} | {'yes' if lay['sparse_kernel'] else 'no: ' + lay['why'][:60]} | "
                             f"{lay['dense_ms']:.4f} | {lay['sparse_ms']:.4f} | {lay['speedup']:.2f}x |")
            if e.get("sparse_kernels"):
                lines.append(f"| {r['model']} | {b} | kernels seen | {', '.join(e['sparse_kernels'][:4])[:200]} | | | | | |")
    for what, err in doc.get("errors", {}).items():
        lines.append(f"\nNot measured: {what}: {err}")
    return "\n".join(lines) + "\n"


def run_child(args, kind: str, no_graphs: bool, budget_s: float) -> tuple[dict | None, str | None]:
    """Benchmark one model in a fresh process, so a CUDA error (a failed graph capture can leave
    the context unusable) costs only that attempt."""
    import subprocess

    part = Path(args.out) / f"part_{kind}{'_eager' if no_graphs else ''}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--out", str(args.out), "--widths", args.widths,
           "--iters", str(args.iters), "--batches", args.batches, "--part", str(part)]
    cmd += ["--no-graphs"] if no_graphs else []
    cmd += ["--dry-run"] if args.dry_run else []
    try:
        proc = subprocess.run(cmd, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {budget_s:.0f} s"
    if proc.returncode != 0 or not part.exists():
        return None, f"child exited with {proc.returncode}"
    return json.loads(part.read_text()), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_sparse_out"))
    ap.add_argument("--widths", default=str(HERE / "gpu_widths.json"))
    ap.add_argument("--iters", type=int, default=100, help="timed replays per variant and batch size")
    ap.add_argument("--models", default="resnet50,bert")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--no-graphs", action="store_true", help="time eager execution, not CUDA graphs")
    ap.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny shapes, few iterations")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for the whole run (children are cut off)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        sys.exit("no CUDA device: use --dry-run to check the script on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    if args.dry_run:
        args.iters = min(args.iters, 3)
    widths = json.loads(Path(args.widths).read_text())
    batches = [int(b) for b in args.batches.split(",")]
    if args.dry_run:
        batches = [min(b, 2) for b in batches]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:  # one model, in this process
        if cuda:
            torch.backends.cudnn.benchmark = True
        res = bench_model(args.child, widths, batches, args, device, dtype, cuda)
        res["graphs"] = not args.no_graphs
        Path(args.part).write_text(json.dumps(res, indent=1))
        return
    cusparselt = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
    env = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "cuda": torch.version.cuda, "cusparselt": bool(cusparselt),
           "cusparselt_version": torch.backends.cusparselt.version() if cusparselt else None,
           "dtype": str(dtype).replace("torch.", ""),
           "mode": "dry run (CPU, tiny shapes, 2:4 kernels not tried)" if args.dry_run else "full"}
    doc = {"env": env, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "widths_file": args.widths,
           "widths_source": widths.get("source"), "published_2_4_end_to_end": list(PUBLISHED_2_4), "models": []}
    kinds = args.models.split(",")
    for i, kind in enumerate(kinds):
        left = args.budget - (time.time() - t0)
        share = left / (len(kinds) - i)
        print(f"[{time.time() - t0:6.1f}s] {kind} (up to {share:.0f} s)", flush=True)
        res, err = run_child(args, kind, args.no_graphs,
                             share if (args.no_graphs or args.dry_run) else share * 0.75)
        if res is None and not args.no_graphs:  # retry once without CUDA graphs
            print(f"{kind}: {err}; again without CUDA graphs", flush=True)
            doc.setdefault("errors", {})[f"{kind} (graphs)"] = err
            res, err = run_child(args, kind, True, max(30.0, args.budget - (time.time() - t0)) / (len(kinds) - i))
        if res is None:
            doc.setdefault("errors", {})[kind] = err
        else:
            doc["models"].append(res)
        doc["seconds"] = time.time() - t0
        (out / "gpu_sparse.json").write_text(json.dumps(doc, indent=1))
        (out / "gpu_sparse.md").write_text(to_markdown(doc))
    print(to_markdown(doc))
    print(f"done in {time.time() - t0:.1f} s; wrote {out / 'gpu_sparse.json'} and {out / 'gpu_sparse.md'}")


if __name__ == "__main__":
    main()
