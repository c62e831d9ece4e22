"""Evaluation data: an .npz of arrays named after the model's inputs, or a folder of images + CSV.

Everything is checked against the model's declared inputs once, here, so that later code can
assume one array per input with a leading sample axis, the right dtype, compatible dims and
finite values. Inputs with a fixed value (--feed, or a value the model names itself, such as a
sample rate) need no array: they are fed whole with every batch.

Besides class ids (`labels`), samples may carry `targets` for a task metric (--metric): an
array with one entry per sample (strings for a recognizer, masks, padded boxes), or several
arrays named `targets_<name>`; a CSV's `target` column gives strings. String `labels` (or a
CSV label column of words) are taken as targets.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from prunec.errors import DataError
from prunec.runtime.inputs import InputSpec, graph_inputs, typed_feeds

#: Prefix of npz arrays (and CSV columns) that name a user slice per sample.
SLICE_PREFIX = "slice_"
#: Prefix of npz arrays (and CSV columns) holding named targets for a task metric.
TARGETS_PREFIX = "targets_"
#: npz keys with a meaning of their own (not model inputs).
RESERVED = ("labels", "lengths", "targets")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


@dataclass
class EvalData:
    """Samples to evaluate on: one array per model input (axis 0 = sample), optional labels/slices."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    #: User slice columns: name (without the `slice_` prefix) -> one value per sample.
    slices: dict[str, np.ndarray] = field(default_factory=dict)
    #: Optional true length of each sample along a dynamic axis (else inferred from padding).
    lengths: np.ndarray | None = None
    source: str = ""
    #: What a task metric scores against: one array (`targets`), or named ones (`targets_<name>`).
    targets: np.ndarray | dict[str, np.ndarray] | None = None
    #: Inputs fed the same value with every batch (--feed, or a value the model names itself).
    fixed: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(next(iter(self.inputs.values())))


@dataclass
class Preprocess:
    """How to turn image files into a model input: resize, scale, mean/std, layout, grayscale."""

    resize: tuple[int, int] | None = None  # (height, width); None = the model's declared H, W
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"  # or "nhwc"
    grayscale: bool = False


def load_data(path: str | Path, model: onnx.ModelProto, *, preprocess: Preprocess | None = None,
              feeds: dict[str, np.ndarray] | None = None) -> EvalData:
    """Load `path` (.npz file, CSV of images, or a folder holding labels.csv) and check it against
    `model`; `feeds` (--feed) fix the values of inputs the data does not hold."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {p}: no such file or folder")
    if p.is_dir():
        csv_path = p / "labels.csv"
        if not csv_path.exists():
            raise DataError(f"--data {p}: a data folder needs a labels.csv with columns file,label[,slice...]")
        return load_image_csv(csv_path, model, preprocess or Preprocess(), feeds=feeds)
    if p.suffix.lower() == ".csv":
        return load_image_csv(p, model, preprocess or Preprocess(), feeds=feeds)
    return load_npz(p, model, feeds=feeds)


def _fixed(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None, held: set[str], where: str
           ) -> dict[str, np.ndarray]:
    """Fixed input values for the inputs the data does not hold; --feed for one it holds is an error."""
    both = sorted(set(feeds or {}) & held)
    if both:
        raise DataError(f"{where}: input(s) {', '.join(both)} are both in the data and given with --feed; "
                        "give each input one way")
    return {k: v for k, v in typed_feeds(model, feeds).items() if k not in held}


def load_npz(path: str | Path, model: onnx.ModelProto, *, feeds: dict[str, np.ndarray] | None = None
             ) -> EvalData:
    """Read an .npz whose arrays are named after the model's inputs (+ labels, lengths, targets,
    targets_*, slice_*)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"--data {p}: not a readable .npz file ({exc})") from None
    specs = graph_inputs(model)
    names = {s.name for s in specs}
    inputs = {k: v for k, v in arrays.items() if k in names}
    stray = sorted(k for k in arrays if k not in names and k not in RESERVED
                   and not k.startswith((SLICE_PREFIX, TARGETS_PREFIX)))
    if stray:
        raise DataError(f"--data {p}: array(s) {', '.join(stray)} are neither model inputs "
                        f"({', '.join(sorted(names))}) nor labels/lengths/targets/targets_<name>/slice_<name>")
    named = {k[len(TARGETS_PREFIX):]: v for k, v in arrays.items() if k.startswith(TARGETS_PREFIX)}
    labels, targets = arrays.get("labels"), arrays.get("targets", named or None)
    if labels is not None and labels.dtype.kind in "US" and targets is None:
        labels, targets = None, labels  # strings (words) are targets for a task metric, not class ids
    data = EvalData(inputs=inputs, labels=labels, lengths=arrays.get("lengths"),
                    slices={k[len(SLICE_PREFIX):]: v for k, v in arrays.items() if k.startswith(SLICE_PREFIX)},
                    source=str(p), targets=targets, fixed=_fixed(model, feeds, set(inputs), f"--data {p}"))
    check_data(data, specs)
    return data


def check_data(data: EvalData, specs: list[InputSpec]) -> None:
    """Raise DataError unless every input is present with a compatible dtype and shape and all columns agree in length."""
    where = f"--data {data.source}" if data.source else "data"
    missing = [s.name for s in specs if s.name not in data.inputs and s.name not in data.fixed]
    if missing:
        raise DataError(f"{where}: no array for model input(s) {', '.join(missing)} "
                        f"(or give a fixed value with --feed {missing[0]}=VALUE)")
    n = None
    for s in specs:
        if s.name not in data.inputs:
            continue
        a = data.inputs[s.name]
        if a.dtype != s.dtype:
            if a.dtype.kind == s.dtype.kind == "f" or (a.dtype.kind in "iu" and s.dtype.kind in "iu"):
                data.inputs[s.name] = a = a.astype(s.dtype)  # float64 -> float32 etc. is harmless
            else:
                raise DataError(f"{where}: input {s.name!r} has dtype {a.dtype}, the model expects {s.dtype}")
        if s.dims and a.ndim != len(s.dims):
            raise DataError(f"{where}: input {s.name!r} has shape {a.shape} (rank {a.ndim}), the model "
                            f"expects rank {len(s.dims)} ({_dims(s.dims)}) with samples on axis 0")
        for axis, (got, want) in enumerate(zip(a.shape, s.dims)):
            if axis and isinstance(want, int) and got != want:
                raise DataError(f"{where}: input {s.name!r} has shape {a.shape}, the model expects "
                                f"{_dims(s.dims)} (axis {axis} must be {want})")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            raise DataError(f"{where}: input {s.name!r} holds NaN or infinite values in {int(bad.sum())} "
                            f"sample(s) (first: sample {int(np.argmax(bad))}); fix or drop them")
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise DataError(f"{where}: inputs have different sample counts ({n} vs {len(a)} for {s.name!r})")
    if not n:
        raise DataError(f"{where}: no samples")
    targets = data.targets if isinstance(data.targets, dict) else {"": data.targets}
    for label, col in [("labels", data.labels), ("lengths", data.lengths)] + [
            (SLICE_PREFIX + k, v) for k, v in data.slices.items()] + [
            (TARGETS_PREFIX + k if k else "targets", v) for k, v in targets.items()]:
        if col is not None and len(col) != n:
            raise DataError(f"{where}: {label} has {len(col)} entries for {n} samples")
    if data.labels is not None and data.labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers (class ids), got dtype {data.labels.dtype}; "
                        "put strings or other targets in `targets` and score them with --metric")


def _dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def load_image_csv(csv_path: str | Path, model: onnx.ModelProto, pre: Preprocess, *,
                   feeds: dict[str, np.ndarray] | None = None) -> EvalData:
    """Read images listed in a CSV (file[,label][,target][,slice columns...]) relative to the CSV's folder."""
    csv_path = Path(csv_path)
    specs = graph_inputs(model)
    fixed = typed_feeds(model, feeds)
    images = [s for s in specs if len(s.dims) == 4 and s.dtype.kind == "f" and s.name not in fixed]
    if len([s for s in specs if s.name not in fixed]) != 1 or not images:
        raise DataError(f"--data {csv_path}: image folders need a model with one 4-D float input; "
                        f"this model has {', '.join(f'{s.name}{_dims(s.dims)}' for s in specs)}")
    spec = images[0]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "file" not in rows[0]:
        raise DataError(f"--data {csv_path}: expected a header row starting with file,label")
    hw_axes = (2, 3) if pre.layout == "nchw" else (1, 2)
    c_axis = 1 if pre.layout == "nchw" else 3
    size = pre.resize or tuple(spec.dims[a] for a in hw_axes)
    if not all(isinstance(d, int) for d in size):
        raise DataError(f"--data {csv_path}: the model's image size is symbolic; pass --resize HxW")
    channels = spec.dims[c_axis] if isinstance(spec.dims[c_axis], int) else (1 if pre.grayscale else 3)
    arrays = [_read_image(csv_path.parent / r["file"], size, channels, pre) for r in rows]
    x = np.stack(arrays).astype(spec.dtype)
    if pre.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    labels = None
    named = {k[len("target_"):]: np.array([r[k] for r in rows]) for k in rows[0] if k.startswith("target_")}
    targets = np.array([r["target"] for r in rows]) if "target" in rows[0] else (named or None)
    if "label" in rows[0]:
        try:
            labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        except ValueError:
            if targets is not None:
                raise DataError(f"--data {csv_path}: the label column must hold integer class ids") from None
            targets = np.array([r["label"] for r in rows])  # words: targets for a task metric
    slices = {k: np.array([r[k] for r in rows]) for k in rows[0]
              if k not in ("file", "label", "target") and not k.startswith("target_")}
    data = EvalData({spec.name: np.ascontiguousarray(x)}, labels, slices, source=str(csv_path),
                    targets=targets, fixed=_fixed(model, feeds, {spec.name}, f"--data {csv_path}"))
    check_data(data, specs)
    return data


def _read_image(path: Path, size: tuple[int, int], channels: int, pre: Preprocess) -> np.ndarray:
    try:
        # Pillow comes with matplotlib; only image folders need it, so import it here.
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError("reading image folders needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 or pre.grayscale else "RGB")
            im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32)
    except FileNotFoundError:
        raise DataError(f"image {path}: no such file") from None
    except OSError as exc:
        raise DataError(f"image {path}: cannot read it ({exc})") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] != channels:
        a = np.repeat(a[:, :, :1], channels, axis=2) if a.shape[2] == 1 else a.mean(2, keepdims=True)
    a = a * pre.scale
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise DataError(f"--mean/--std need 1 or {channels} values")
    return (a - mean) / std


def load_calibration(path: str | Path, model: onnx.ModelProto, *, preprocess: Preprocess | None = None
                     ) -> EvalData:
    """Load calibration samples: like `load_data`, but labels are not needed and an image folder
    without labels.csv is read whole (every image file in it, sorted by name)."""
    p = Path(path)
    try:
        if p.is_dir() and not (p / "labels.csv").exists():
            return _load_image_folder(p, model, preprocess or Preprocess())
        return load_data(p, model, preprocess=preprocess)
    except DataError as exc:
        raise DataError(str(exc).replace("--data", "--calib", 1)) from None


def _load_image_folder(folder: Path, model: onnx.ModelProto, pre: Preprocess) -> EvalData:
    import tempfile

    files = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--calib {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    # One loader for images: write the file list as a CSV beside nothing and read it as usual.
    with tempfile.TemporaryDirectory(prefix="prunec-calib-") as d:
        listing = Path(d) / "files.csv"
        listing.write_text("file\n" + "".join(f"{(folder / f).resolve()}\n" for f in files))
        data = load_image_csv(listing, model, pre)
    data.source = str(folder)
    return data

