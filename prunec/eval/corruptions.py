"""Image corruptions at severities 1-5 (after ImageNet-C), seeded, for NCHW float batches.

Pruned networks tend to keep clean accuracy and lose it on degraded inputs, so every image
model is also evaluated on these. Inputs may be normalised any way: each corruption works on
the data mapped to [0, 1] using the clean data's own range, and the result is mapped back, so
severities mean the same for 0..255 pixels and for mean/std-normalised tensors.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from prunec.errors import OptionError

SEVERITIES = (1, 2, 3, 4, 5)


def _gaussian_noise(x, s, rng):
    sigma = (0.04, 0.08, 0.12, 0.18, 0.26)[s - 1]
    return x + rng.normal(0.0, sigma, size=x.shape)


def _shot_noise(x, s, rng):
    photons = (60.0, 25.0, 12.0, 5.0, 3.0)[s - 1]
    return rng.poisson(np.clip(x, 0, 1) * photons) / photons


def _gaussian_blur(x, s, rng):
    h, w = x.shape[-2:]
    # ImageNet-C uses sigma 1..6 at 224 px; small images still need a visible blur.
    sigma = (0.5, 0.75, 1.0, 1.5, 2.0)[s - 1] * max(1.0, min(h, w) / 64)
    return blur(x, sigma)


def _contrast(x, s, rng):
    c = (0.6, 0.45, 0.3, 0.2, 0.1)[s - 1]
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - m) * c + m


def _brightness(x, s, rng):
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]


def _pixelate(x, s, rng):
    factor = (0.75, 0.6, 0.5, 0.4, 0.25)[s - 1]
    h, w = x.shape[-2:]
    return pixelate(x, max(1, round(h * factor)), max(1, round(w * factor)))


def _rotation(x, s, rng):
    from scipy import ndimage

    max_deg = (2.0, 4.0, 6.0, 8.0, 10.0)[s - 1]
    out = np.empty_like(x)
    for i, angle in enumerate(rng.uniform(-max_deg, max_deg, size=len(x))):
        out[i] = ndimage.rotate(x[i], angle, axes=(2, 1), reshape=False, order=1, mode="nearest")
    return out


#: name -> function(x in [0, 1], severity, rng) -> corrupted x (clipped afterwards).
CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
}
#: Corruptions a `mixed` sample combines.
MIX_DEPTH = 3


def _mixed(x, s, rng):
    """Several degradations at once, as camera and scanner input has them: each sample gets
    MIX_DEPTH distinct corruptions of `all`, in random order, each at a severity drawn from 1..s."""
    names = list(CORRUPTIONS)
    out = np.empty_like(x)
    for i in range(len(x)):
        y = x[i:i + 1]
        for k in rng.choice(len(names), size=MIX_DEPTH, replace=False):
            y = np.clip(CORRUPTIONS[names[k]](y, int(rng.integers(1, s + 1)), rng), 0.0, 1.0)
        out[i] = y[0]
    return out


#: Asked for by name only, never part of `all` (so the gate's default slices and the default
#: calibration views stay as they are). `rotation`: small in-plane rotations, up to 2-10 degrees
#: by severity, as scanned or photographed text and documents have; where orientation carries the
#: label (a direction classifier, digits 6 and 9) it is not a corruption. `mixed`: three of the
#: corruptions of `all` at once per sample (`_mixed`); a new kind of slice, so opt-in too.
EXTRA_CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "rotation": _rotation,
    "mixed": _mixed,
}
_ALL_KNOWN = {**CORRUPTIONS, **EXTRA_CORRUPTIONS}


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes with reflected borders (numpy only)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    for axis in (-2, -1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        # Reflect needs radius < size; 'symmetric' repeated padding handles tiny images too.
        xp = np.pad(x, pad, mode="symmetric") if radius < x.shape[axis] else np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(k[i] * np.take(xp, np.arange(i, i + n), axis=axis) for i in range(len(k)))
    return x


def pixelate(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Average HxW source pixels into h x w blocks and scale back up by repetition."""
    H, W = x.shape[-2:]
    rows = np.arange(H) * h // H
    cols = np.arange(W) * w // W
    r0 = np.searchsorted(rows, np.arange(h))
    c0 = np.searchsorted(cols, np.arange(w))
    small = np.add.reduceat(x, r0, axis=-2) / np.bincount(rows, minlength=h)[:, None]
    small = np.add.reduceat(small, c0, axis=-1) / np.bincount(cols, minlength=w)
    return small[..., rows, :][..., cols]


def parse_corruptions(text: str | None) -> list[str]:
    """`all`, `none`, or a comma list of corruption names -> validated names."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    names: list[str] = []
    for t in (t.strip() for t in text.split(",")):  # `all` may be combined: all,rotation
        for n in (list(CORRUPTIONS) if t.lower() == "all" else [t] if t else []):
            if n not in names:
                names.append(n)
    bad = [n for n in names if n not in _ALL_KNOWN]
    if bad:
        raise OptionError(f"unknown corruption(s) {', '.join(bad)}; valid: all, none, {', '.join(_ALL_KNOWN)}")
    return names


def parse_severities(text: str | None) -> list[int]:
    """`1,3,5` -> [1, 3, 5]; each in 1..5."""
    if text is None:
        return [3]
    try:
        sev = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise OptionError(f"--severities {text!r}: expected integers 1-5, e.g. 1,3,5") from None
    if not sev or any(s not in SEVERITIES for s in sev):
        raise OptionError(f"--severities {text!r}: each severity must be 1-5")
    return sev


def corrupt(x: np.ndarray, name: str, severity: int, *, seed: int = 0,
            value_range: tuple[float, float] | None = None, layout: str = "nchw") -> np.ndarray:
    """Apply corruption `name` at `severity` (1-5) to a float batch; same seed, same result."""
    if name not in _ALL_KNOWN:
        raise OptionError(f"unknown corruption {name!r}; valid: {', '.join(_ALL_KNOWN)}")
    if severity not in SEVERITIES:
        raise OptionError(f"corruption severity must be 1-5, got {severity}")
    if x.ndim != 4 or x.dtype.kind != "f":
        raise OptionError(f"corruptions need a 4-D float image batch, got {x.dtype} {x.shape}")
    lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
    span = (hi - lo) or 1.0
    y = (x.astype(np.float64) - lo) / span
    if layout == "nhwc":
        y = y.transpose(0, 3, 1, 2)
    # One stream per (seed, corruption, severity): adding a corruption does not change another.
    rng = np.random.default_rng([seed, list(_ALL_KNOWN).index(name), severity])
    y = np.clip(_ALL_KNOWN[name](y, severity, rng), 0.0, 1.0)
    if layout == "nhwc":
        y = y.transpose(0, 2, 3, 1)
    return (y * span + lo).astype(x.dtype)


def image_layout(dims: tuple) -> str | None:
    """'nchw' or 'nhwc' for a 4-D image input's declared dims, None when it does not look like an image."""
    if len(dims) != 4:
        return None
    if dims[1] in (1, 3, 4):
        return "nchw"
    if dims[3] in (1, 3, 4):
        return "nhwc"
    return "nchw" if isinstance(dims[2], int) and dims[2] == dims[3] else None
