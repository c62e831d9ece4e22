"""Task metrics: the user's own Python function, scoring model outputs against the data's targets.

`--metric module:function` or `--metric path/to/file.py:function` names it. The contract
(docs/task-metrics.md has examples):

    def metric(outputs: dict[str, np.ndarray], targets) -> np.ndarray

- `outputs`: every model output by name, samples on axis 0 (N samples, any N);
- `targets`: the same N samples of the data's `targets` array (e.g. strings), or a dict
  {name: array} when the data holds `targets_<name>` arrays, or the `labels` array when it holds
  neither;
- returns N per-sample scores, floats in [0, 1] (1 = right). Per-sample scores, not a mean:
  prunec averages them per slice and bootstraps the intervals of the drop over samples.
- optional attribute `metric.chance` (in [0, 1], default 0): the score of a model that guesses,
  so that corrupted slices where the original is near chance are flagged, not gated.

Each sample must be scored independently of the others: prunec calls the function on all
samples of one input variant (clean, or one corruption) at once and slices the scores.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunec.errors import DataError, OptionError


@dataclass(frozen=True)
class TaskMetric:
    """A loaded metric function, its name, its chance level and a digest of its source (for caches)."""

    name: str
    spec: str
    fn: Callable[[dict[str, np.ndarray], Any], Any]
    chance: float = 0.0
    digest: str = ""

    def __call__(self, outputs: dict[str, np.ndarray], targets: Any) -> np.ndarray:
        """Per-sample scores, checked: one finite float in [0, 1] per sample."""
        n = len(next(iter(outputs.values())))
        try:
            raw = self.fn(outputs, targets)
        except Exception as exc:  # the user's code: say where, in one line
            raise DataError(f"--metric {self.spec} raised {type(exc).__name__}: {exc}") from exc
        try:
            scores = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"--metric {self.spec} returned {type(raw).__name__}, expected an array of "
                            f"{n} per-sample scores") from None
        if scores.size != n or (scores.ndim > 1 and scores.shape[0] != n):
            raise DataError(f"--metric {self.spec} returned shape {list(scores.shape)} for {n} samples; "
                            "it must return one score per sample (not a mean)")
        scores = scores.reshape(n)
        if not np.all(np.isfinite(scores)) or scores.min(initial=0) < -1e-9 or scores.max(initial=0) > 1 + 1e-9:
            raise DataError(f"--metric {self.spec} returned scores outside [0, 1] (min {np.nanmin(scores):.3g}, "
                            f"max {np.nanmax(scores):.3g}); scale them to 0..1, 1 = right")
        return np.clip(scores, 0.0, 1.0)


def load_metric(spec: str) -> TaskMetric:
    """Import `module:function` or `path/to/file.py:function`; one-line OptionError if that fails."""
    target, colon, func = spec.rpartition(":")
    if not colon or not target or not func:
        raise OptionError(f"--metric {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target)
            if not path.is_file():
                raise OptionError(f"--metric {spec}: no such file {path}")
            name = f"prunec_metric_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module  # dataclasses and pickling inside the module need it
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except OptionError:
        raise
    except Exception as exc:  # anything the user's module raises while importing
        raise OptionError(f"--metric {spec}: importing {target} raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise OptionError(f"--metric {spec}: {target} has no function {func!r}")
    chance = getattr(fn, "chance", 0.0)
    if not isinstance(chance, (int, float)) or not 0 <= chance <= 1:
        raise OptionError(f"--metric {spec}: {func}.chance must be a number in [0, 1], got {chance!r}")
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = spec
    return TaskMetric(func, spec, fn, float(chance), hashlib.sha256(source.encode()).hexdigest()[:16])


def select(targets: np.ndarray | dict[str, np.ndarray] | None, idx: np.ndarray | None):
    """The targets of samples `idx` (all when None), keeping a dict of named targets a dict."""
    if targets is None or idx is None:
        return targets
    if isinstance(targets, dict):
        return {k: v[idx] for k, v in targets.items()}
    return targets[idx]
