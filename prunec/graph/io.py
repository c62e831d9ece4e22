"""Loading and saving ONNX models safely.

Loading turns every way a file can be wrong into one `ModelLoadError` line. Saving is atomic
(temp file in the target folder, then rename), never overwrites the input unless asked, and
switches to external data when the protobuf would pass the 2 GB limit.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from prunec import interrupts
from prunec.errors import ModelLoadError, ModelSaveError, PrunecError

#: Oldest default-domain opset prunec works on directly; older models are converted up.
MIN_OPSET = 11
#: Opset that old models are converted to (well supported by ONNX Runtime and the converter).
CONVERT_TO_OPSET = 13
#: Protobuf's hard limit on one serialized message.
PROTOBUF_LIMIT = 2**31 - 1
#: Leave headroom: graph structure and attributes add to the weights' bytes.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20


@dataclass
class LoadedModel:
    """A loaded model and what we learned while loading it."""

    model: onnx.ModelProto
    path: Path
    converted_from_opset: int | None = None


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain ('' or 'ai.onnx') opset version, 0 if none is declared."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load_model(path: str | os.PathLike, *, convert_old_opset: bool = True) -> LoadedModel:
    """Read and validate an ONNX file, with external data files resolved beside it."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    if not raw:
        raise ModelLoadError(f"{p}: file is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except DecodeError as exc:
        raise ModelLoadError(
            f"{p}: not a valid ONNX protobuf (corrupt or truncated file): {exc}"
        ) from exc
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelLoadError(f"{p}: not an ONNX model (no graph, IR version or opset in the file)")
    _check_text(model, p)
    _load_external_data(model, p)
    try:
        onnx.checker.check_model(model if model.ByteSize() < PROTOBUF_LIMIT else str(p))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{p}: invalid or truncated ONNX model: {first}") from exc

    converted = None
    opset = default_opset(model)
    if opset and opset < MIN_OPSET:
        if not convert_old_opset:
            raise ModelLoadError(f"{p}: opset {opset} is older than {MIN_OPSET}")
        model = _convert_opset(model, p, opset)
        converted = opset
    return LoadedModel(model=model, path=p, converted_from_opset=converted)


def _check_text(message, p: Path, where: str = "model") -> None:
    """Refuse string fields that are not valid UTF-8 (protobuf hands them over as bytes, and
    every name would then break printing, JSON and rewriting far from the cause)."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        # protobuf 6+ has is_repeated; older versions only the label.
        repeated = field.is_repeated if hasattr(field, "is_repeated") else \
            field.label == FieldDescriptor.LABEL_REPEATED
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if repeated else [value]
            for i, item in enumerate(items):
                _check_text(item, p, f"{where}.{field.name}[{i}]" if len(items) > 1 else f"{where}.{field.name}")
        elif field.type == FieldDescriptor.TYPE_STRING:
            items = value if repeated else [value]
            bad = next((v for v in items if isinstance(v, bytes)), None)
            if bad is not None:
                raise ModelLoadError(f"{p}: {where}.{field.name} is not valid UTF-8 text ({bad[:40]!r}); "
                                     "the file is corrupt or was written by a broken exporter")


def _load_external_data(model: onnx.ModelProto, p: Path) -> None:
    from onnx.external_data_helper import (
        load_external_data_for_model,
        uses_external_data,
        _get_all_tensors,
    )

    tensors = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if not tensors:
        return
    base = p.parent.resolve()
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if not target.is_relative_to(base):
            raise ModelLoadError(
                f"{p}: external data location {loc!r} of tensor {t.name!r} points outside "
                "the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{p}: missing external data file {loc!r} for tensor {t.name!r} "
                f"(expected at {target})"
            )
    try:
        load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{p}: cannot read external data: {exc}") from exc
    for t in tensors:
        expected = _expected_nbytes(t)
        if expected is not None and len(t.raw_data) != expected:
            raise ModelLoadError(
                f"{p}: external data for tensor {t.name!r} is truncated "
                f"({len(t.raw_data)} of {expected} bytes)"
            )


def _expected_nbytes(t: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type in (onnx.TensorProto.STRING,):
        return None
    return n * itemsize


def _convert_opset(model: onnx.ModelProto, p: Path, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, CONVERT_TO_OPSET)
        # The converter keeps the old IR version, which is too old to declare the new opset.
        converted.ir_version = max(converted.ir_version,
                                   onnx.helper.find_min_ir_version_for(converted.opset_import))
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(
            f"{p}: opset {opset} is older than {MIN_OPSET} and cannot be converted to opset "
            f"{CONVERT_TO_OPSET}: {reason}"
        ) from exc
    return converted


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in initializers and Constant nodes (what external data would hold)."""
    from onnx.external_data_helper import _get_all_tensors

    total = 0
    for t in _get_all_tensors(model):
        total += len(t.raw_data) if t.HasField("raw_data") else (_expected_nbytes(t) or 0)
    return total


#: What `stat` says a path is, for every kind of file prunec refuses to write over.
_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISSOCK, "a socket"))


def write_target(path: str | os.PathLike) -> Path:
    """The file a write to `path` replaces: `path` itself or, when `path` is a symlink, the file
    it points to (resolved through every link), so that the link is kept and its target updated."""
    p = Path(path)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def _kind(mode: int) -> str | None:
    return next((what for test, what in _SPECIAL if test(mode)), None)


def check_new_file(path: str | os.PathLike, label: str, error: type[PrunecError],
                   noun: str = "a file name") -> Path:
    """Fail fast, before any work, unless a regular file can be written at `path`.

    Refused: directories, devices, FIFOs and sockets (also behind a symlink), a missing parent
    folder, and a folder where no file can be created (read-only, no permission, /proc); the
    last is probed by creating and removing an empty temp file. `label` starts the one-line
    message, `error` is its type."""
    p = Path(path)
    target = write_target(p)
    via = f" (a link to {target})" if target != p else ""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise error(f"{label}{via}: cannot use it: {exc.strerror or exc}") from None
    kind = _kind(mode) if mode is not None else None
    if kind == "a directory":
        raise error(f"{label}{via}: is a directory; give {noun}")
    if kind is not None:
        raise error(f"{label}{via}: is {kind}, not a regular file; prunec only writes regular files "
                    "(give a file name)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"{label}: folder {parent} does not exist")
    check_writable_folder(parent, label, error)
    return p


def check_writable_folder(folder: Path, label: str, error: type[PrunecError]) -> None:
    """Create and remove an empty temp file in `folder`; a one-line `error` if that fails."""
    try:
        with interrupts.deferred():
            fd, probe = tempfile.mkstemp(prefix=".prunec-probe.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise error(f"{label}: cannot create a file in {folder}: {exc.strerror or exc}") from None


@contextmanager
def atomic_write(path: str | os.PathLike, label: str, error: type[PrunecError]):
    """Yield a temp file path beside `path`'s target; on success rename it over the target
    (unless the writer removed the temp file: nothing to write).

    Whatever goes wrong (an OSError such as ENOSPC, EIO, EACCES; a signal; a bug), the temp file
    is removed and the target is untouched. OSErrors become one-line `error`s naming `label`."""
    target = write_target(path)
    parent = target.parent if str(target.parent) else Path(".")
    tmp = None
    try:
        with interrupts.deferred():  # no signal between creating the temp file and recording it
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
            tmp = Path(name)
        os.close(fd)
        yield tmp
        if not tmp.exists():  # the writer found nothing to write and removed it
            tmp = None
            return
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, file_mode(target))
        with interrupts.deferred():
            os.replace(tmp, target)
            tmp = None
    except OSError as exc:
        raise error(f"{label}: cannot write: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None,
                      *, in_place: bool = False) -> Path:
    """Validate an output path before any work is done, so a bad path fails fast."""
    out = check_new_file(output, str(output), ModelSaveError, "a file name for the output model")
    if input_path is not None and out.exists() and out.resolve() == Path(input_path).resolve():
        if not in_place:
            raise ModelSaveError(
                f"{out}: refusing to overwrite the input model; pass --in-place to do that"
            )
    return out


def file_mode(target: str | os.PathLike) -> int:
    """Permissions for a file about to replace `target`: its current mode, else 0666 minus umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def save_model(model: onnx.ModelProto, output: str | os.PathLike, *,
               input_path: str | os.PathLike | None = None, in_place: bool = False,
               external_data: bool | None = None) -> Path:
    """Write `model` to `output` atomically; external data is used when needed (or forced).

    A symlink at `output` is kept and the file it points to is replaced. Any OS error is a
    one-line ModelSaveError, and no temp file is left behind."""
    out = check_output_path(output, input_path, in_place=in_place)
    if external_data is None:
        external_data = weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    target = write_target(out)
    with atomic_write(out, str(out), ModelSaveError) as tmp:
        if external_data:
            _write_with_external_data(model, tmp, target)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
    return out


def _write_with_external_data(model: onnx.ModelProto, tmp: Path, target: Path) -> None:
    """Write the model proto to `tmp` and its weights to `<target>.data` (itself atomically)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    data_name = f"{target.name}.data"
    with atomic_write(target.parent / data_name, str(target.parent / data_name), ModelSaveError) as tmp_data:
        # Write weights to a temp data file, then point the tensors at the final data file name.
        m = onnx.ModelProto()
        m.CopyFrom(model)
        onnx.save_model(m, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tmp_data.name, size_threshold=1024)
        m2 = onnx.load_model(str(tmp), load_external_data=False)
        for t in _get_all_tensors(m2):
            if uses_external_data(t):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
        with open(tmp, "wb") as f:
            f.write(m2.SerializeToString())
        if not tmp_data.stat().st_size:  # every tensor is under onnx's threshold: no data file
            tmp_data.unlink()
