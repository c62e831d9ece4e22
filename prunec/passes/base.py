"""What a pass is: a name, a typed options dataclass, and `run(graph, ctx) -> PassResult`.

Options are plain dataclasses whose fields carry `help` in their metadata; the CLI's `-O`
parser, recipes and `prunec passes` are all generated from them (one source of truth).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.graph.proof import Reference


def option(default: Any, help: str, **kw) -> Any:
    """Declare a pass option with a default and a help text."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def check_regex(name: str, pattern: str | None) -> None:
    """An OptionError naming option `name` (e.g. 'channels.protect') when `pattern` does not compile."""
    if pattern:
        import re

        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionError(f"{name} is not a valid regex: {exc}") from None


@dataclass
class NoOptions:
    """A pass without options."""


@dataclass
class Skip:
    """Something a pass left alone, and why (shown to users; never silent)."""

    what: str
    why: str


@dataclass
class Calibration:
    """Unlabelled samples that passes may run the model on (one array per model input, samples
    on axis 0). `independent` is False when they are the accuracy gate's own --data, which
    then no longer measures the result on unseen samples."""

    inputs: dict[str, np.ndarray]
    source: str = ""
    independent: bool = True
    #: Padded sequences: [samples, L] True at real positions of the sequence axis (axis 1 of the
    #: token inputs), so statistics of [N, L, ..., C] activations skip padding.
    mask: np.ndarray | None = None
    #: Inputs the *original* model gets when recovery takes its targets (sample by sample beside
    #: `inputs`; default: the same). E.g. clean images as targets for corrupted `inputs`.
    targets: dict[str, np.ndarray] | None = None
    #: Per sample, the view it is ("clean", or a corruption such as "gaussian_noise@3") when
    #: corrupted views were added (prunec.eval.calib_views); every sample weighs the same in
    #: every objective, so a view's weight is its share of the samples.
    views: np.ndarray | None = None
    #: One line for the summary: which views were added and their weights (or why none were).
    note: str = ""

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(next(iter(self.inputs.values())))

    def take(self, n: int | None) -> "Calibration":
        """The first `n` samples (all when n is None or larger than what there is)."""
        if n is None or n >= self.n:
            return self
        return Calibration({k: v[:n] for k, v in self.inputs.items()}, self.source, self.independent,
                           None if self.mask is None else self.mask[:n],
                           None if self.targets is None else {k: v[:n] for k, v in self.targets.items()},
                           None if self.views is None else self.views[:n], self.note)


#: Indices kept along one axis of one tensor, by tensor name and axis (see PassContext.kept).
KeptChannels = dict[str, dict[int, np.ndarray]]


@dataclass
class PassContext:
    """What a pass may need beyond the graph: input shapes, calibration data, a seed, a logger,
    and the target the model will run on (a prunec.runtime.target.Target, e.g. from --runtime;
    `channels` rounds widths for it).

    The PassManager fills the run-scoped fields: `baseline` (the model as it was before the
    first lossy pass of the run: recovery passes aim back at it), `kept` (which channels of
    each tensor survive, relative to the baseline) and `activations` (a store that runs the
    calibration data through a model once and shares the statistics between passes)."""

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Deprecated alias of `calib`: the gate's data, used for calibration (not independent).
    data: dict[str, np.ndarray] | None = None
    #: Fixed values for some inputs (--feed), used wherever the model is run on made-up inputs.
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0
    #: Passes may change graph input/output shapes along channel axes (`--allow-interface-change`).
    allow_interface_change: bool = False
    log: typing.Callable[[str], None] = lambda msg: None
    target: typing.Any = None
    #: Conditions that hold of the graph the pass is given (see Pass.requires), kept by the manager.
    holds: set[str] = field(default_factory=set)
    calib: Calibration | None = None
    #: The model before the run's first lossy pass (see `baseline`): a ModelProto, or a file in the
    #: run's store (prunec.graph.store.ModelFile), read only when a pass asks for it.
    _baseline: Any = field(default=None, repr=False)
    kept: KeptChannels = field(default_factory=dict)
    activations: Any = None  # prunec.runtime.activations.ActivationStore, made by the manager
    #: Passes (or pass options) that ran on calibration data in this run, for the summary.
    calib_users: list[str] = field(default_factory=list)
    _target_store: Any = field(default=None, repr=False)

    @property
    def baseline(self) -> onnx.ModelProto | None:
        """The model before the run's first lossy pass (what recovery passes aim back at)."""
        b = self._baseline
        if b is not None and not isinstance(b, onnx.ModelProto):
            b = self._baseline = b.load()
        return b

    @baseline.setter
    def baseline(self, value) -> None:
        self._baseline = value

    def __post_init__(self) -> None:
        if self.calib is None and self.data is not None:
            self.calib = Calibration(self.data, "data", independent=False)

    def require_calib(self, user: str) -> Calibration:
        """The calibration data for `user` (e.g. 'channels.compensate'), recorded as used;
        a DataError naming `user` when there is none."""
        from prunec.errors import DataError

        if self.calib is None:
            raise DataError(f"{user} needs calibration data: pass --calib samples.npz "
                            "(or --data, which then also serves as calibration)")
        if user not in self.calib_users:
            self.calib_users.append(user)
        return self.calib

    def store(self, user: str, *, targets: bool = False):
        """The run's activation store over the calibration inputs for `user` (recorded as used);
        with `targets`, the store over the inputs the original model gets for recovery targets
        (the same store unless the calibration has separate `targets`)."""
        from prunec.runtime.activations import ActivationStore

        calib = self.require_calib(user)
        if targets and calib.targets is not None:
            if self._target_store is None:
                self._target_store = ActivationStore(calib.targets, mask=calib.mask)
            return self._target_store
        if self.activations is None:
            self.activations = ActivationStore(calib.inputs, mask=calib.mask)
        return self.activations

    def record_kept(self, kept: KeptChannels) -> None:
        """Compose the channels a pass kept (relative to its input) into `kept` (relative to the
        baseline), so a later pass can find each kept channel's index in the baseline."""
        for name, axes in kept.items():
            mine = self.kept.setdefault(name, {})
            for axis, idx in axes.items():
                idx = np.asarray(idx, dtype=np.int64)
                mine[axis] = mine[axis][idx] if axis in mine else idx


@dataclass
class PassResult:
    """What a pass changed, in numbers. `details` is pass-specific and JSON-serialisable.

    A lossy pass says how the manager can prove it did what it meant: `reference` is a model its
    result must equal within the exact tolerance (`channels`: the original with the removed
    channels masked where they are read); `masked_weights` names the initializers a
    weight-masking pass wrote, each of which must be the old value times a 0/1 mask, with
    nothing else in the model changed. The manager checks either, then drops `reference`."""

    changed: bool
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    reference: Reference | None = None
    masked_weights: set[str] | None = None
    #: Graph inputs/outputs whose channel axes changed (allowed by `allow_interface_change`):
    #: name -> axis -> indices kept. The manager verifies on feeds and outputs sliced this way.
    interface: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    #: What users must know about the result (e.g. normalization statistics that changed).
    notes: list[str] = field(default_factory=list)


class Pass:
    """Base class of every pass. Subclasses set `name`, `summary`, `exact`, `Options`, `run`.

    A pass may declare conditions on the graph (`prunec.passes.manager.CONDITIONS`, e.g.
    "folded"): `requires()` what must hold before it runs, which the manager establishes once
    and remembers, rather than each pass redoing it; `preserves` what still holds after it changed
    the graph, if it held before (a pass that changes nothing preserves everything)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: True when the rewrite must preserve outputs (verified within tolerance); False for lossy.
    exact: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions
    #: Conditions that still hold after this pass changed the graph, if they held before.
    preserves: ClassVar[frozenset[str]] = frozenset()
    #: A weight-masking pass (its result names `masked_weights`): the manager keeps the model
    #: before it, against which those weights are proven to be masks.
    masks_weights: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def requires(self) -> frozenset[str]:
        """Conditions the graph must meet before `run` (they may depend on the options)."""
        return frozenset()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (importing prunec.passes registers the built-in ones)."""
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """Look a pass up by name, with an error listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(_REGISTRY))}") from None


@dataclass
class OptionInfo:
    """One option of a pass, for help output and parsing."""

    name: str
    type_name: str
    default: Any
    help: str


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + "?" if len(args) == 1 else "|".join(map(_type_name, args))
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def option_infos(options_cls: type) -> list[OptionInfo]:
    """Describe every option of an options dataclass."""
    infos = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        infos.append(OptionInfo(_public_name(f.name), _type_name(_field_type(options_cls, f)),
                                default, f.metadata.get("help", "")))
    return infos


def _public_name(field_name: str) -> str:
    """Field name as users type it: `fold_constants` -> `fold-constants`, `global_` -> `global`."""
    return field_name.rstrip("_").replace("_", "-")


def _field_name(key: str) -> str:
    """Inverse of _public_name: a Python keyword such as `global` is stored as `global_`."""
    import keyword

    name = key.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except OptionError as exc:
                errors.append(str(exc))
        raise OptionError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            # -O gives strings, so Literal[2, 4] must also match "2".
            if value == c and type(value) is type(c) or isinstance(value, str) and value == str(c):
                return c
        raise OptionError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise OptionError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise OptionError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise OptionError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    if tp is Path:
        return Path(value)
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_coerce(v, item, where) for v in items]
    raise OptionError(f"{where}: unsupported option type {tp}")


def make_options(pass_cls: type[Pass], values: dict[str, Any]) -> Any:
    """Build a pass's options from raw values (strings from -O, or typed values from a recipe)."""
    opts_cls = pass_cls.Options
    fields = {f.name: f for f in dataclasses.fields(opts_cls)}
    kwargs = {}
    for raw_key, raw in values.items():
        key = _field_name(raw_key)
        if key not in fields:
            valid = ", ".join(_public_name(f) for f in fields) or "(none)"
            raise OptionError(f"unknown option {pass_cls.name}.{raw_key}; valid options of "
                              f"{pass_cls.name}: {valid}")
        kwargs[key] = _coerce(raw, _field_type(opts_cls, fields[key]), f"{pass_cls.name}.{raw_key}")
    try:
        opts = opts_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{pass_cls.name}: {exc}") from exc
    validate = getattr(opts, "validate", None)
    if validate:
        validate()
    return opts


def parse_option_flags(flags: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Parse repeated `-O pass.key=value` flags into {pass: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for flag in flags or ():
        lhs, eq, value = flag.partition("=")
        pname, dot, key = lhs.strip().rpartition(".")
        if not eq or not dot or not pname or not key:
            raise OptionError(f"-O {flag!r}: expected pass.key=value, e.g. -O channels.ratio=0.5")
        out.setdefault(pname, {})[key] = value.strip()
    return out


def read_json_file(path: str | Path, what: str) -> Any:
    """Parse a JSON file named by an option (`what`, e.g. 'channels.plan'), as one-line errors."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OptionError(f"{what} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"{what} {path}: not valid JSON: {exc}") from None
