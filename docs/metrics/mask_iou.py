"""Task metric for semantic segmentation: mean intersection-over-union per image.

    prunec check seg.onnx pruned.onnx --data scenes.npz --metric docs/metrics/mask_iou.py:mean_iou

Data: the images under the model's input name and the true masks as `targets`, integer class
ids of shape (N, H, W), e.g. `np.savez("scenes.npz", image=x, targets=masks)`.

The first model output holds per-pixel class scores, (N, C, H, W). Per image, the score is the
mean over classes present in the prediction or the truth of |pred ∩ true| / |pred ∪ true|
(1.0 for a perfect mask); pixels labelled IGNORE (255 by default) are left out.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255


def mean_iou(outputs: dict[str, np.ndarray], targets: np.ndarray) -> np.ndarray:
    """One mean IoU in [0, 1] per image."""
    pred = next(iter(outputs.values())).argmax(1)
    truth = np.asarray(targets)
    if truth.shape != pred.shape:
        raise ValueError(f"targets have shape {truth.shape}, predictions {pred.shape}; "
                         "targets must be (N, H, W) class ids")
    scores = np.empty(len(pred))
    for i, (p, t) in enumerate(zip(pred, truth)):
        valid = t != IGNORE
        p, t = p[valid], t[valid]
        classes = np.union1d(np.unique(p), np.unique(t))
        ious = [np.logical_and(p == c, t == c).sum() / np.logical_or(p == c, t == c).sum() for c in classes]
        scores[i] = float(np.mean(ious)) if ious else 1.0
    return scores
