"""Scale benchmark (issue 17): sensitivity trials per second, sweeps over workers and Ray, the
`channels` pass time against onnxsim. Time and peak memory of `prunec run` by model size are
`benchmarks/scale_ir.py` (issue 17 part B).

Runs in the system Python with prunec's test extra (`pip install -e '.[test]'`, which has ray);
the recognizer is PP-OCRv4's text recognizer from the rapidocr wheel (nothing is downloaded at
run time; fetch it once):

    pip download --no-deps rapidocr_onnxruntime==1.4.4 -d /tmp/rapid && \\
        unzip -o -j /tmp/rapid/*.whl '*/ch_PP-OCRv4_rec_infer.onnx' -d /tmp/rapid
    PYTHONPATH=. python benchmarks/scale.py trials --rec /tmp/rapid/ch_PP-OCRv4_rec_infer.onnx
    PYTHONPATH=. python benchmarks/scale.py workers --rec /tmp/rapid/ch_PP-OCRv4_rec_infer.onnx

`passes` times the `channels` pass against onnxsim 0.8.1 on torchvision models, so it runs in the
channels benchmark's environment (BENCHMARKS.md, `benchmarks/channels.py`):

    PYTHONPATH=. .bench/bin/python benchmarks/scale.py passes [--models shufflenet_v2_x1_0,...]

Recognizer inputs are words rendered with the DejaVu fonts (`fonts-dejavu-core`), 48x320 as
rapidocr feeds them; labels are the original's own per-position predictions, so the metric is
exact agreement of the whole decoded path (prunec's top-1 on [N, 40] labels).
Each part prints a markdown table and the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {datetime.date.today()}, load {os.getloadavg()[0]:.1f} at start"


# -- data

def render_words(n: int, seed: int = 0) -> np.ndarray:
    """n random words rendered black on white, resized to height 48, padded to 320 (rapidocr's
    recognizer batch shape), scaled to [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))
    if not fonts:
        sys.exit("needs the DejaVu fonts (apt-get install fonts-dejavu-core)")
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    out = np.zeros((n, 3, 48, 320), np.float32)
    for i in range(n):
        word = "".join(rng.choice(letters, rng.integers(3, 12)))
        font = ImageFont.truetype(fonts[i % len(fonts)], 32)
        box = font.getbbox(word)
        w, h = box[2] - box[0] + 12, box[3] - box[1] + 12
        im = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(im).text((6 - box[0], 6 - box[1]), word, font=font, fill=(0, 0, 0))
        width = min(320, round(w * 48 / h))
        a = (np.asarray(im.resize((width, 48)), np.float32) / 255 - 0.5) / 0.5
        out[i, :, :, :width] = a.transpose(2, 0, 1)
    return out


def recognizer(path: str, n: int, batch="auto"):
    """(model, Evaluator, PassContext) for the recognizer on n rendered words, evaluated at `batch`
    (`auto`: the fastest measured, as the CLI does by default)."""
    from prunec.eval.data import EvalData
    from prunec.eval.gate import Evaluator, predict
    from prunec.passes import PassContext

    model = onnx.load(path)
    x = render_words(n)
    labels = predict(model, {"x": x}).argmax(-1)  # the original's own path: exact agreement
    return (model, Evaluator(model, EvalData({"x": x}, labels), batch_size=batch),
            PassContext(input_shapes={"x": (1, 3, 48, 320)}))


def demo(batch="auto"):
    from prunec.eval.data import load_npz
    from prunec.eval.gate import Evaluator
    from prunec.passes import PassContext

    model = onnx.load(ROOT / "models" / "demo_cnn.onnx")
    data = load_npz(ROOT / "models" / "demo_digits_test.npz", model)
    return model, Evaluator(model, data, batch_size=batch), PassContext()


# -- trials per second, old (rewrite) vs new (masked)

def timed_sweep(model, ev, ctx, ratios, **kw):
    from prunec.eval.sensitivity import sensitivity

    t0 = time.perf_counter()
    rep = sensitivity(model, ev, ratios, ctx=ctx, cache=None, options={}, **kw)
    seconds = time.perf_counter() - t0
    return rep, seconds, sum(len(g.trials) for g in rep.groups)


def old_trials(model, ev, ctx, ratios, limit: int | None):
    """The old method (prune, verify-free PassManager run, fresh session, evaluate) on the first
    `limit` trials: (seconds per trial, {key: Trial})."""
    from prunec.eval.sensitivity import channel_groups, prune

    base = ev.reference_value()
    keys, seconds = {}, []
    for g in channel_groups(model, ctx=ctx):
        if g.frozen:
            continue
        for r in ratios:
            if limit is not None and len(seconds) >= limit:
                return float(np.mean(seconds)), keys
            t0 = time.perf_counter()
            pruned, _ = prune(model, {"default_ratio": 0.0, "groups": {g.id: r}}, ctx=ctx)
            value = ev.metric_value(pruned)
            seconds.append(time.perf_counter() - t0)
            keys[f"{g.id}@{r:g}"] = (value, base - value)
    return float(np.mean(seconds)), keys


def cmd_trials(args) -> None:
    ratios = [0.2, 0.4]
    print(f"_{machine()}_\n")
    print("| model | data | batch (measuring s) | one forward pass s | trials | old s/trial | "
          "new s/trial (sweep incl. setup) | new setup s | speedup | same results |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    batch = args.batch if args.batch == "auto" else int(args.batch)
    cases = [("demo CNN", "540 digits", lambda: demo(batch), None)]
    if args.rec:
        cases.append(("PP-OCRv4 rec", f"{args.images} words 48x320",
                      lambda: recognizer(args.rec, args.images, batch), args.old_limit))
    for name, data, load, limit in cases:
        from prunec.eval.trials import TrialGraph

        model, ev, ctx = load()
        t0 = time.perf_counter()
        ev.outputs(model, ["clean"])  # the unit a trial is measured against: the model on all the data
        forward = time.perf_counter() - t0
        t0 = time.perf_counter()
        TrialGraph(model, input_shapes=ctx.input_shapes)  # the sweep's fixed cost: fold, analysis, cuts
        setup = time.perf_counter() - t0 + ev.batch.seconds  # measuring the batch is part of it
        rep, new_s, n = timed_sweep(model, ev, ctx, ratios)
        new_s += ev.batch.seconds
        old_s, old = old_trials(model, ev, ctx, ratios, limit)
        new = {f"{g.group.id}@{t.ratio:g}": (t.metric, t.drop) for g in rep.groups for t in g.trials}
        same = all(new[k] == v for k, v in old.items())
        print(f"| {name} | {data} | {ev.batch.batch} ({ev.batch.seconds:.1f}) | {forward:.2f} | {n} | {old_s:.2f} (first {len(old)}) | {new_s / n:.2f} | {setup:.1f} | "
              f"{old_s / (new_s / n):.1f}x | {'yes' if same else 'NO'} ({len(old)} compared) |", flush=True)


# -- one sweep on 1 and 2 local workers and on Ray

def cmd_workers(args) -> None:
    from prunec.eval.executor import ExecutorSettings

    print(f"_{machine()}_\n")
    print("| model | executor | workers | sweep s | speedup vs 1 | identical to 1 worker |")
    print("|---|---|---:|---:|---:|---|")
    cases = [("demo CNN", demo)]
    if args.rec:
        cases.append((f"PP-OCRv4 rec, {args.images} words", lambda: recognizer(args.rec, args.images)))
    for name, load in cases:
        model, ev, ctx = load()
        ref, base_s, _ = timed_sweep(model, ev, ctx, [0.2, 0.4])
        print(f"| {name} | local | 1 | {base_s:.1f} | 1.00 | - |", flush=True)
        for label, settings in (("local", ExecutorSettings(jobs=2)), ("ray (local, 2 CPUs)", "ray")):
            if settings == "ray":
                import ray

                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                settings = ExecutorSettings(kind="ray", jobs=2)
            try:
                rep, s, _ = timed_sweep(model, ev, ctx, [0.2, 0.4], executor=settings)
            finally:
                if settings.kind == "ray":
                    ray.shutdown()
            same = rep.to_dict() == ref.to_dict()
            print(f"| {name} | {label} | 2 | {s:.1f} | {base_s / s:.2f} | {'yes' if same else 'NO'} |", flush=True)


# -- pass time against onnxsim (in the channels benchmark's environment)

def cmd_passes(args) -> None:
    import channels as bench  # benchmarks/channels.py: the same zoo, BN calibration and export
    import onnxsim
    import torch

    from prunec.graph.ir import from_onnx
    from prunec.passes import PassContext, build_passes

    print(f"_{machine()}, onnxsim {onnxsim.__version__}; CPU seconds of the pruning step alone, "
          f"best of {args.reps}_\n")
    print("| model | ratio | prunec s | onnxsim s | prunec / onnxsim |")
    print("|---|---|---:|---:|---:|")
    names = args.models.split(",")
    zoo = bench.zoo()
    for name in names:
        torch.manual_seed(0)
        model = bench.export(bench.calibrate_bn(zoo[name](), 224), 224)
        for ratio in (0.3, 0.5):
            mine, theirs = [], []
            for _ in range(args.reps):  # alternated, so load on the machine hits both alike
                p = build_passes(["channels"], {"channels": {"ratio": ratio}})[0]
                g = from_onnx(model)
                t0 = time.process_time()
                p.run(g, PassContext())
                mine.append(time.process_time() - t0)
                t0 = time.process_time()
                try:
                    onnxsim.apply_structured_pruning(model, sparsity=ratio)
                    theirs.append(time.process_time() - t0)
                except Exception:  # noqa: BLE001  (onnxsim fails on some models; that is a result)
                    theirs.append(float("nan"))
            a, b = min(mine), min(theirs)
            print(f"| {name} | {ratio} | {a:.3f} | {b:.3f} | {a / b:.1f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trials", help="sensitivity trials per second, old vs new")
    t.add_argument("--rec", default=None, help="ch_PP-OCRv4_rec_infer.onnx")
    t.add_argument("--images", type=int, default=400)
    t.add_argument("--old-limit", type=int, default=6, help="old-method trials timed on the recognizer")
    t.add_argument("--batch", default="auto", help="evaluation batch: auto (measured, the CLI default) or N")
    w = sub.add_parser("workers", help="one sweep on 1 and 2 local workers and on a local Ray cluster")
    w.add_argument("--rec", default=None)
    w.add_argument("--images", type=int, default=400)
    p = sub.add_parser("passes", help="channels pass CPU time against onnxsim (bench environment)")
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,densenet121,shufflenet_v2_x1_0")
    p.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "passes":
        sys.path.insert(0, str(ROOT / "benchmarks"))
    {"trials": cmd_trials, "workers": cmd_workers, "passes": cmd_passes}[args.cmd](args)


if __name__ == "__main__":
    main()
