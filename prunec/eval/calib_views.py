"""Corrupted calibration views: what recovery and selection see besides the clean samples.

Recovery fitted on clean samples only keeps clean accuracy and loses the model's robustness:
least squares fits each layer in the subspace the clean activations span, and degraded inputs
leave it (on the PP-OCRv4 recognizer at 14.8% of MACs removed, clean-calibrated reconstruction
kept 0.990 of 0.995 exact match on clean renders and fell from 0.925 to 0.460 on degraded ones;
benchmarks/robust.py). So, for 4-D image inputs, the
calibration set gets corrupted copies of its samples (prunec's corruption set, at severities
1-5), and every data-driven pass (compensation means, `reconstruct`, `recalibrate`,
`importance=reconstruction|activation`) fits or scores over clean and corrupted views together.

Weights: every sample weighs the same in every objective, so a view's weight is its share of
the samples: `fraction` for the corrupted views together (split evenly between the corruption
and severity pairs), `1 - fraction` for the clean ones. Copies are interleaved with the clean
samples, so the first N samples a pass may take (`reconstruct.samples`, held-out every fifth
sample) have the same mix.

Targets (`targets`): by default (`view`) recovery matches the original model's behaviour on the
same view it feeds the pruned model: the pruned model should do what the original does wherever
it is used, which is reachable (the original itself maps that input to that output) and is what
the gate compares on every slice. `clean` asks the pruned model to produce, from a corrupted
view, the original's output on the clean sample: a denoising objective that early layers of a
smaller model cannot meet (the information is gone from the input), so its residual spreads
into the fit; it is there to measure, not the default.
"""

from __future__ import annotations

import numpy as np
import onnx

from prunec.errors import OptionError
from prunec.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt, image_layout, parse_corruptions
from prunec.eval.slices import CLEAN
from prunec.passes.base import Calibration
from prunec.runtime.inputs import graph_inputs

#: Severities of corrupted calibration views: the whole range, so the fit covers mild to harsh.
CALIB_SEVERITIES = SEVERITIES
TARGETS = ("view", "clean")


def parse_calib_corruptions(text: str | None) -> list[str] | None:
    """`auto` -> None (decided by the model's inputs), `none` -> [], else validated names."""
    if text is None or text.strip().lower() == "auto":
        return None
    return parse_corruptions(text)


def check_fraction(fraction: float) -> float:
    """--calib-corrupt-fraction must leave clean samples: 0 <= f < 1."""
    if not 0 <= fraction < 1:
        raise OptionError(f"--calib-corrupt-fraction {fraction:g}: expected a share in [0, 1), e.g. 0.5")
    return fraction


def image_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Float 4-D image inputs of `model` and their layout ('nchw' or 'nhwc')."""
    return {s.name: image_layout(s.dims) for s in graph_inputs(model)
            if s.dtype.kind == "f" and image_layout(s.dims)}


def schedule(n_clean: int, fraction: float) -> np.ndarray:
    """Per position of the combined set, True where a corrupted copy goes: `fraction` of the
    positions, spread so that every prefix has about the same share."""
    if fraction <= 0 or n_clean == 0:
        return np.zeros(n_clean, dtype=bool)
    n_corr = int(round(n_clean * fraction / (1 - fraction)))
    total = n_clean + n_corr
    share = n_corr / total
    i = np.arange(total)
    return np.floor((i + 1) * share + 1e-9) > np.floor(i * share + 1e-9)


def add_views(calib: Calibration, model: onnx.ModelProto, *, corruptions: str | None = "auto",
              fraction: float = 0.5, targets: str = "view", seed: int = 0) -> Calibration:
    """`calib` with corrupted copies of its samples interleaved (see the module docstring), its
    `views` labelled and its `note` saying what was added and with which weights; unchanged
    (with a note) when the model has no 4-D image input or no corruptions are asked for."""
    check_fraction(fraction)
    if targets not in TARGETS:
        raise OptionError(f"--calib-view-targets {targets!r}: expected one of {', '.join(TARGETS)}")
    names = parse_calib_corruptions(corruptions)
    images = image_inputs(model)
    explicit = names is not None
    if names is None:
        names = list(CORRUPTIONS) if images else []
    if not images:
        if explicit and names:
            raise OptionError("--calib-corruptions needs a 4-D float image input (NCHW or NHWC); "
                              "this model has none (use --calib-corruptions none)")
        calib.note = "calibration views: clean only (no 4-D image input, so no corrupted views were added)"
        return calib
    if not names or fraction == 0:
        calib.note = "calibration views: clean only (--calib-corruptions none or fraction 0)"
        return calib
    n = calib.n
    where = schedule(n, fraction)
    n_corr = int(where.sum())
    pairs = [(c, s) for s in CALIB_SEVERITIES for c in names]
    rng = np.random.default_rng((seed, 19))
    # Which clean sample each copy corrupts (every sample once before any twice), which view.
    src_of_copy = np.concatenate([rng.permutation(n) for _ in range(-(-n_corr // n))])[:n_corr]
    view_of_copy = np.arange(n_corr) % len(pairs)
    src = np.empty(len(where), dtype=np.int64)
    src[~where] = np.arange(n)
    src[where] = src_of_copy
    labels = np.full(len(where), CLEAN, dtype=object)
    inputs = {k: v[src] for k, v in calib.inputs.items()}
    for name, layout in images.items():
        x = calib.inputs[name]
        lo, hi = float(x.min()), float(x.max())  # the clean data's range (corruptions map to [0, 1])
        pos = np.flatnonzero(where)
        for v, (c, s) in enumerate(pairs):
            sel = pos[view_of_copy == v]
            if len(sel):
                inputs[name][sel] = corrupt(x[src[sel]], c, s, seed=seed, value_range=(lo, hi), layout=layout)
                labels[sel] = f"{c}@{s}"
    tgt = None
    if targets == "clean":
        base = calib.targets if calib.targets is not None else calib.inputs
        tgt = {k: v[src] for k, v in base.items()}
    mask = None if calib.mask is None else calib.mask[src]
    out = Calibration(inputs, calib.source, calib.independent, mask, tgt, labels.astype(str))
    sev = f"{CALIB_SEVERITIES[0]}-{CALIB_SEVERITIES[-1]}"
    what = "the original's output on the clean sample" if targets == "clean" else \
        "the original's output on the same view"
    out.note = (f"calibration views: {n} clean (weight {1 - n_corr / len(where):.2f}) + {n_corr} corrupted "
                f"(weight {n_corr / len(where):.2f}: {len(names)} corruption(s) x severities {sev}, "
                f"{n_corr / len(where) / len(pairs):.3f} each) on input(s) {', '.join(images)}; "
                f"recovery targets: {what}")
    return out


def view_weights(calib: Calibration) -> dict[str, float]:
    """Share of the samples of each view (what each weighs in every calibration objective)."""
    if calib.views is None:
        return {CLEAN: 1.0}
    values, counts = np.unique(calib.views, return_counts=True)
    return {str(v): c / calib.n for v, c in zip(values, counts)}
