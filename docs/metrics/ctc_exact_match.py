"""Task metric for a CTC text recognizer: exact match of the greedy-decoded string.

    prunec check rec.onnx pruned.onnx --data words.npz --metric docs/metrics/ctc_exact_match.py:exact_match

Data: the images under the recognizer's input name, and the true words as strings, either in
`targets` (or `labels`) of the .npz, e.g. `np.savez("words.npz", x=images, targets=np.array(words))`,
or in the `target` (or `label`) column of a CSV image list.

Decoding: the first model output holds per-step class scores, (N, T, C) (set CTC_OUTPUT to use
another output; CTC_TIME_MAJOR=1 for (T, N, C)). Class 0 is the CTC blank and class k is
CHARSET[k - 1]. CTC_CHARSET names where the characters come from: a text file with one per
line (PaddleOCR's dictionary format), or an .onnx recognizer whose `character` metadata holds
them (PaddleOCR and rapidocr models carry their dictionary there); both get PaddleOCR's space
class appended. By default: the 36 characters 0-9 and a-z. Greedy decoding: best class per step,
repeats merged, blanks dropped; leading and trailing spaces are ignored when comparing.

    CTC_CHARSET=rec.onnx prunec check rec.onnx pruned.onnx --data words.npz \
        --metric docs/metrics/ctc_exact_match.py:exact_match
"""

from __future__ import annotations

import os

import numpy as np

BLANK = 0


def _charset() -> list[str]:
    path = os.environ.get("CTC_CHARSET")
    if not path:
        return list("0123456789abcdefghijklmnopqrstuvwxyz")
    if path.endswith(".onnx"):
        import onnx

        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        return meta["character"].splitlines() + [" "]
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f] + [" "]


CHARSET = _charset()


def decode(scores: np.ndarray) -> list[str]:
    """Greedy CTC decoding of (N, T, C) class scores into N strings."""
    best = np.asarray(scores).argmax(-1)
    texts = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != BLANK)
        texts.append("".join(CHARSET[k - 1] if k - 1 < len(CHARSET) else "\ufffd" for k in row[keep]))
    return texts


def exact_match(outputs: dict[str, np.ndarray], targets) -> np.ndarray:
    """1.0 where the decoded string equals the target string, else 0.0 (one score per sample)."""
    name = os.environ.get("CTC_OUTPUT")
    scores = outputs[name] if name else next(iter(outputs.values()))
    if os.environ.get("CTC_TIME_MAJOR") == "1":
        scores = np.swapaxes(scores, 0, 1)
    return np.array([text.strip() == str(want).strip() for text, want in zip(decode(scores), targets)],
                    dtype=float)


#: Guessing a whole word right is (nearly) impossible: chance is 0.
exact_match.chance = 0.0
