"""Scale benchmark, part B (issue 17): time and peak resident memory of `prunec run` by model
size (one IR through the run, bounded memory), before and after, and ResNet-50 end to end.

Runs in the system Python with prunec's test extra; ResNet-50 is exported with torch
(`benchmarks/resnet.py`, random weights), the wide CNNs are built here with random weights and
streamed to disk one tensor at a time (a 2.5 GB model is never whole in memory here):

    PYTHONPATH=. python benchmarks/scale_ir.py [--sizes 10,100,500,2500] [--before COMMIT] \\
        [--reps 3] [--resnet] [--tmp /tmp]

Models under 2 GB are run as one .onnx file (as they usually ship), larger ones with external
data. Each run is a fresh process; wall time, user+sys CPU time and peak RSS (the kernel's
maximum resident set of that process) are reported; `--before` runs the prunec package of that
commit (git archive) the same way. The "fixed" column subtracts the peak of a run on the 0.4 MB
demo CNN: what the interpreter and its libraries (onnx, ONNX Runtime, numpy, rich) take
whatever the model. Prints markdown tables with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def machine() -> str:
    name = platform.processor() or platform.machine()
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
        if line.startswith("Model name"):
            name = line.split(":", 1)[1].strip()
    return f"{name}, {os.cpu_count()} cores, {datetime.date.today()}, load {os.getloadavg()[0]:.1f} at start"


def wide_cnn(path: Path, megabytes: int, seed: int = 0) -> tuple[int, int]:
    """x [N, 64, 4, 4] -> conv 3x3 -> BN -> ReLU -> (conv 1x1 -> BN -> ReLU) x L -> GAP -> Gemm,
    width and depth chosen so the weights take about `megabytes` MB; random weights, written to
    external data one tensor at a time. Returns (width, layers)."""
    from onnx import TensorProto, helper

    width = 512 if megabytes <= 20 else 1024 if megabytes <= 200 else 2048 if megabytes <= 1000 else 4096
    layers = max(1, round(megabytes * 1e6 / (4 * width * width)))
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    with open(path.with_name(path.name + ".data"), "wb") as data:

        def add(name, a):
            a = np.ascontiguousarray(a, dtype=np.float32)
            t = TensorProto(name=name, dims=list(a.shape), data_type=TensorProto.FLOAT)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", path.name + ".data"), ("offset", str(data.tell())), ("length", str(a.nbytes))):
                t.external_data.add(key=k, value=v)
            data.write(a.tobytes())
            inits.append(t)

        def bn(x, c, p):
            add(p + "s", rng.uniform(0.5, 1.5, c))
            add(p + "b", rng.normal(0, 0.1, c))
            add(p + "m", rng.normal(0, 0.1, c))
            add(p + "v", rng.uniform(0.5, 1.5, c))
            nodes.append(helper.make_node("BatchNormalization", [x, p + "s", p + "b", p + "m", p + "v"], [p + "y"],
                                          name=p + "bn"))
            nodes.append(helper.make_node("Relu", [p + "y"], [p + "r"]))
            return p + "r"

        add("w0", rng.standard_normal((width, 64, 3, 3), dtype=np.float32) / 24)
        nodes.append(helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"))
        x = bn("c0", width, "l0")
        for i in range(1, layers + 1):
            add(f"w{i}", rng.standard_normal((width, width, 1, 1), dtype=np.float32) / np.sqrt(width))
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
            x = bn(f"c{i}", width, f"l{i}")
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["p"]))
        nodes.append(helper.make_node("Flatten", ["p"], ["f"]))
        add("fc", rng.standard_normal((10, width), dtype=np.float32) / np.sqrt(width))
        add("fcb", np.zeros(10))
    nodes.append(helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc"))
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path.write_bytes(m.SerializeToString())
    return width, layers


def single_file(path: Path) -> Path:
    """A copy of an external-data model as one .onnx file."""
    one = path.with_name(path.stem + "-single.onnx")
    onnx.save(onnx.load(str(path)), str(one))
    return one


def _build(path: Path, mb: int) -> tuple[int, int]:
    """`wide_cnn` (and below 2 GB its `single_file` copy) in a child process: a child's peak RSS
    counts the pages it shares with this process when forked, so this one stays small."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import scale_ir as s; "
            f"from pathlib import Path; p = Path({str(path)!r}); print(*s.wide_cnn(p, {mb}))"
            + ("; s.single_file(p)" if mb < 2000 else ""))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    width, layers = out.split()
    return int(width), int(layers)


def _extract(commit: str, dest: Path) -> Path:
    """The prunec package as it was at `commit` (git archive), for the 'before' rows."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "prunec"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(cmd: list[str], code: Path, limit_gb: float) -> dict:
    """Run `cmd` with `code` first on PYTHONPATH: wall seconds, user+sys CPU seconds and peak RSS
    (VmHWM, polled, and the kernel's ru_maxrss; killed above `limit_gb`)."""
    env = dict(os.environ, PYTHONPATH=str(code))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        # In `code` too: `python -m` puts the working folder first on the path.
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, text=True, cwd=code)
        peak, killed = 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if peak > limit_gb * 2**30 and not killed:
                proc.kill()
                killed = True
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        err.seek(0)
        lines = [ln for ln in err.read().strip().splitlines() if ln.strip()]
    rc = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": max(peak, usage.ru_maxrss * 1024),
            "rc": rc, "killed": killed, "error": (lines[-1] if lines else "")[:160]}


def _runs(cmd, code, limit_gb, reps):
    """`reps` runs: (median wall, median CPU, highest peak, first failure or None)."""
    rs = [run_child(cmd, code, limit_gb) for _ in range(reps)]
    bad = next((r for r in rs if r["rc"] != 0), None)
    return (float(np.median([r["wall"] for r in rs])), float(np.median([r["cpu"] for r in rs])),
            max(r["peak"] for r in rs), bad)


def _result(bad, limit_gb) -> str:
    if bad is None:
        return "ok"
    return f"killed at {limit_gb:g} GB" if bad["killed"] else f"exit {bad['rc']}: {bad['error']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,500,2500", help="wide CNN sizes in MB")
    ap.add_argument("--before", help="a commit to compare with (its prunec package)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--resnet", action="store_true", help="also ResNet-50 end to end (needs torch)")
    ap.add_argument("--limit-gb", type=float, default=16.0)
    ap.add_argument("--tmp", default=None, help="folder for the models (needs ~3x the largest size free)")
    args = ap.parse_args()
    passes = ["--passes", "fold-bn,cleanup,channels", "-O", "channels.ratio=0.3", "--no-profile"]
    prunec = [sys.executable, "-m", "prunec", "run"]
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        d = Path(d)
        codes = {"after": ROOT}
        if args.before:
            codes = {"before": _extract(args.before, d / "before"), **codes}
        print(f"_{machine()}; `prunec run MODEL {' '.join(passes)} -o out.onnx`, a fresh process per run, "
              f"median of {args.reps} (time), highest of {args.reps} (peak RSS); before = {args.before}_\n")
        demo = ROOT / "models" / "demo_cnn.onnx"
        fixed = {k: _runs([*prunec, str(demo), *passes, "-o", str(d / "o.onnx")], code, args.limit_gb, args.reps)[2]
                 for k, code in codes.items()}
        print("fixed cost (the demo CNN, 0.4 MB): " + ", ".join(f"{k} {v / 1e6:,.0f} MB" for k, v in fixed.items()))
        print()
        print("| model | layout | on disk | code | wall s | CPU s | peak RSS | peak / size | (peak - fixed) / size | result |")
        print("|---|---|---:|---|---:|---:|---:|---:|---:|---|")
        for mb in [int(s) for s in args.sizes.split(",") if s]:
            src = d / f"wide{mb}.onnx"
            width, layers = _build(src, mb)
            model = src if mb >= 2000 else src.with_name(src.stem + "-single.onnx")
            layout = "external data" if model == src else "one file"
            if model != src:
                src.unlink()
                src.with_name(src.name + ".data").unlink()
            size = sum(p.stat().st_size for p in d.iterdir() if p.name.startswith(model.name))
            for label, code in codes.items():
                wall, cpu, peak, bad = _runs([*prunec, str(model), *passes, "-o", str(d / "out.onnx")], code,
                                             args.limit_gb, args.reps)
                print(f"| wide CNN {width}x{layers} | {layout} | {size / 1e6:,.0f} MB | {label} | {wall:.1f} | "
                      f"{cpu:.1f} | {peak / 1e6:,.0f} MB | {peak / size:.2f}x | {(peak - fixed[label]) / size:.2f}x | "
                      f"{_result(bad, args.limit_gb)} |", flush=True)
                for p in d.glob("out.onnx*"):
                    p.unlink()
            for p in d.glob(model.name + "*"):
                p.unlink()
        if args.resnet:
            path = d / "resnet50.onnx"
            # benchmarks/resnet.py (torch), in a child process: see _build.
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                            f"import resnet; resnet.export_resnet50({str(path)!r})"], check=True, capture_output=True)
            print(f"\nResNet-50 ({path.stat().st_size / 1e6:.0f} MB, batch N, random weights): "
                  "load, passes, verification, save, a fresh process\n")
            print("| passes | code | wall s | CPU s | peak RSS | result |")
            print("|---|---|---:|---:|---:|---|")
            for p in ("channels", "fold-bn,cleanup,channels"):
                for label, code in codes.items():
                    wall, cpu, peak, bad = _runs([*prunec, str(path), "--passes", p, "--no-profile",
                                                  "-o", str(d / "out.onnx")], code, args.limit_gb, args.reps)
                    print(f"| {p} | {label} | {wall:.2f} | {cpu:.2f} | {peak / 1e6:,.0f} MB | "
                          f"{_result(bad, args.limit_gb)} |", flush=True)


if __name__ == "__main__":
    main()
