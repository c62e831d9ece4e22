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
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from google.protobuf.message import DecodeError

from prunec import interrupts
from prunec.counters import count
from prunec.errors import ModelLoadError, ModelSaveError, PrunecError

if TYPE_CHECKING:
    from prunec.graph.store import ModelFile

#: Oldest default-domain opset prunec works on directly; older models are converted up.
MIN_OPSET = 11
#: Opset that old models are converted to (well supported by ONNX Runtime and the converter).
CONVERT_TO_OPSET = 13
#: Protobuf's hard limit on one serialized message.
PROTOBUF_LIMIT = 2**31 - 1
#: Leave headroom: graph structure and attributes add to the weights' bytes.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20


class LoadedModel:
    """A loaded model and what we learned while loading it.

    `model` is the whole protobuf. A caller that moves the weights elsewhere (`prunec run`: into
    the graph it edits) takes it with `release()` so it is not held twice; `model` then reads the
    file again if something still asks for it. A model opened with `load_model(lazy_weights=True)`
    has a `skeleton` instead: the protobuf without its large weights, which it refers to where
    they lie (as ONNX external data, relative to the model's folder: in the .onnx file itself,
    or in its external data files), and `model` is read only when asked for."""

    def __init__(self, model: onnx.ModelProto | None, path: Path, converted_from_opset: int | None = None,
                 skeleton: onnx.ModelProto | None = None):
        self._model = model
        self.path = path
        self.converted_from_opset = converted_from_opset
        self.skeleton = skeleton

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = load_model(self.path).model
        return self._model

    @property
    def structure(self) -> onnx.ModelProto:
        """The model's graph, interface and small tensors: the skeleton if there is one (its
        large weights not read), else the whole model. For what needs no weight values."""
        return self.skeleton if self.skeleton is not None else self.model

    def release(self) -> onnx.ModelProto:
        """Hand the protobuf over to the caller and forget it here."""
        model, self._model = self.model, None
        return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain ('' or 'ai.onnx') opset version, 0 if none is declared."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load_model(path: str | os.PathLike, *, convert_old_opset: bool = True,
               lazy_weights: bool = False) -> LoadedModel:
    """Read and validate an ONNX file, with external data files resolved beside it.

    With `lazy_weights`, large weights stay in the files (see LoadedModel.skeleton) and are read
    later straight into arrays, never into a protobuf.
    Validation is the same (a model that cannot be opened so is loaded whole)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    skeleton = _open_lazily(p) if lazy_weights else None
    count("checker")
    checker_error = None
    try:
        # By path, and before Python holds the model: the checker reads the file itself (any
        # size), and its copy is freed before ours is made. Its verdict waits for the checks
        # below, whose messages say more about the usual ways a file is broken.
        onnx.checker.check_model(str(p))
    except (onnx.checker.ValidationError, UnicodeDecodeError) as exc:  # the latter: its message quotes bad names
        checker_error = exc
    if skeleton is not None and _valid(skeleton, p, checker_error) and \
            not 0 < default_opset(skeleton) < MIN_OPSET:  # an old opset is converted from the whole model
        return LoadedModel(None, p, skeleton=skeleton)
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
    del raw
    _check_fields(model, p)
    _load_external_data(model, p)
    _raise_checker_error(checker_error, p)

    converted = None
    opset = default_opset(model)
    if opset and opset < MIN_OPSET:
        if not convert_old_opset:
            raise ModelLoadError(f"{p}: opset {opset} is older than {MIN_OPSET}")
        model = _convert_opset(model, p, opset)
        converted = opset
    return LoadedModel(model=model, path=p, converted_from_opset=converted)


def _check_fields(model: onnx.ModelProto, p: Path) -> None:
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelLoadError(f"{p}: not an ONNX model (no graph, IR version or opset in the file)")
    _check_text(model, p)


def _raise_checker_error(exc: BaseException | None, p: Path) -> None:
    if exc is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"{p}: invalid or truncated ONNX model: {first}") from exc


def _valid(skeleton: onnx.ModelProto, p: Path, checker_error: BaseException | None) -> bool:
    """The checks of a whole load, on a lazily opened model: True when it passes them."""
    _check_fields(skeleton, p)
    _check_external_data(skeleton, p, load=False)
    _raise_checker_error(checker_error, p)
    return True


# ----------------------------------------------------------------------------------------------
# Opening a model without parsing its weights
#
# A protobuf parser copies every weight into the message it builds, and a numpy array made from
# that message copies it again. To read weights straight from the file into arrays, the file is
# split first: `_cut_weights` walks the protobuf wire format down to each initializer's raw_data
# (ModelProto.graph -> GraphProto.initializer -> TensorProto.raw_data) and returns the file
# without those bytes, and where they are. The rest is parsed as usual, and each initializer
# whose bytes were cut becomes an external-data tensor whose data file is the model file itself.

#: raw_data at least this large stays in the file.
LAZY_MIN_BYTES = 1024
#: Field numbers (onnx.proto) of ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


class _NotSplittable(Exception):
    """The file is not a protobuf this walker understands (the whole parse then decides)."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotSplittable
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _skip(buf, pos: int, wire_type: int, end: int) -> int:
    if wire_type == 0:
        return _varint(buf, pos, end)[1]
    if wire_type == 2:
        n, pos = _varint(buf, pos, end)
        pos += n
    elif wire_type in (1, 5):
        pos += 8 if wire_type == 1 else 4
    else:  # groups (3, 4) are not used by ONNX
        raise _NotSplittable
    if pos > end:
        raise _NotSplittable
    return pos


def _key(buf, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = _varint(buf, pos, end)
    return key >> 3, key & 7, pos


def _cut_weights(buf) -> tuple[bytes, list[tuple[int, int, int]]]:
    """(the model's bytes without large raw weight data, [(initializer index, offset, length)])."""
    from prunec.graph.store import field_prefix

    cuts: list[tuple[int, int, int]] = []
    index = 0

    def tensor(start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
        out, pos, cut, raw = bytearray(), start, None, False
        while pos < end:
            first = pos
            field, wire, pos = _key(buf, pos, end)
            if field == _RAW_DATA and wire == 2:
                if raw:
                    raise _NotSplittable  # raw_data twice: the last wins, as the parser decides
                raw = True
                n, body = _varint(buf, pos, end)
                if n >= LAZY_MIN_BYTES:
                    if body + n > end:
                        raise _NotSplittable
                    cut, pos = (body, n), body + n
                    continue
            pos = _skip(buf, pos, wire, end)
            out += buf[first:pos]
        return bytes(out), cut

    def graph(start: int, end: int) -> bytes:
        nonlocal index
        out, pos = bytearray(), start
        while pos < end:
            first = pos
            field, wire, pos = _key(buf, pos, end)
            if field == _INITIALIZER and wire == 2:
                n, pos = _varint(buf, pos, end)
                body, cut = tensor(pos, pos + n)
                if cut is not None:
                    cuts.append((index, *cut))
                index += 1
                out += field_prefix(_INITIALIZER, len(body)) + body
                pos += n
                continue
            pos = _skip(buf, pos, wire, end)
            out += buf[first:pos]
        return bytes(out)

    out, pos, end = bytearray(), 0, len(buf)
    while pos < end:
        first = pos
        field, wire, pos = _key(buf, pos, end)
        if field == _GRAPH and wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _NotSplittable
            body = graph(pos, pos + n)
            out += field_prefix(_GRAPH, len(body)) + body
            pos += n
            continue
        pos = _skip(buf, pos, wire, end)
        out += buf[first:pos]
    return bytes(out), cuts


def _open_lazily(p: Path) -> onnx.ModelProto | None:
    """The model without its large raw weights, which it refers to as external data in `p`
    itself; None when the file is not split so (the whole parse then reads it, or says why not)."""
    import mmap

    from prunec.graph.store import WeightRef, set_external

    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            data, cuts = _cut_weights(buf)
    except (OSError, ValueError, _NotSplittable):  # unreadable, empty (mmap refuses), not a protobuf
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        return None
    tensors = model.graph.initializer
    for index, offset, length in cuts:
        if tensors[index].data_location == onnx.TensorProto.EXTERNAL:
            return None  # raw data and an external location at once: the whole parse decides
        set_external(tensors[index], WeightRef(p.name, offset, length))
    return model


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
    _check_external_data(model, p, load=True)


def _check_external_data(model: onnx.ModelProto, p: Path, *, load: bool) -> None:
    """Check every external-data tensor's file (inside the model's folder, present, long
    enough) and, with `load`, read the data into the tensors. A tensor whose data is in the
    model file itself (see `_open_lazily`) is never loaded so."""
    from onnx.external_data_helper import (
        _get_all_tensors,
        load_external_data_for_model,
        uses_external_data,
    )

    tensors = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if not tensors:
        return
    base = p.parent.resolve()
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if loc == p.name and not load:
            target = p
        else:
            target = (base / loc).resolve()
        if target != p and not target.is_relative_to(base):
            raise ModelLoadError(
                f"{p}: external data location {loc!r} of tensor {t.name!r} points outside "
                "the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{p}: missing external data file {loc!r} for tensor {t.name!r} "
                f"(expected at {target})"
            )
        # Checked before any read, so a lazy and a whole load say the same of a short file.
        try:
            offset, length = int(info.get("offset", 0)), info.get("length")
            length = int(length) if length is not None else None
        except ValueError as exc:
            raise ModelLoadError(f"{p}: external data of tensor {t.name!r} has a bad offset or length") from exc
        size = target.stat().st_size
        have = max(0, min(size - offset, length if length is not None else size - offset))
        expected = _expected_nbytes(t)
        if expected is not None and have != expected:
            raise ModelLoadError(f"{p}: external data for tensor {t.name!r} is truncated "
                                 f"({have} of {expected} bytes)")
    if not load:
        return
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


def save_model(model: onnx.ModelProto | ModelFile, output: str | os.PathLike, *,
               input_path: str | os.PathLike | None = None, in_place: bool = False,
               external_data: bool | None = None) -> Path:
    """Write `model` to `output` atomically; external data is used when needed (or forced).

    `model` is a ModelProto or a model in a run's store (`prunec.graph.store.ModelFile`), whose
    weights are streamed from the store's data file into the output. A symlink at `output` is
    kept and the file it points to is replaced. Any OS error is a one-line ModelSaveError, and no
    temp file is left behind."""
    from prunec.graph.store import ModelFile

    out = check_output_path(output, input_path, in_place=in_place)
    if external_data is None:
        # A store's skeleton declares the dims of its external weights, so this counts them too.
        external_data = weight_bytes(model.skeleton if isinstance(model, ModelFile) else model) \
            >= EXTERNAL_DATA_THRESHOLD
    target = write_target(out)
    with atomic_write(out, str(out), ModelSaveError) as tmp:
        if isinstance(model, ModelFile):
            _write_model_file(model, tmp, target, external_data)
        elif external_data:
            _write_with_external_data(model, tmp, target)
        else:
            count("serialize")
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
    return out


def _write_model_file(model: ModelFile, tmp: Path, target: Path, external_data: bool) -> None:
    """Stream a store's model to `tmp`: one protobuf, or with its weights in `<target>.data`."""
    from prunec.graph.store import write_external, write_single_file

    if not external_data:
        with open(tmp, "wb") as f:
            write_single_file(model, f)
            f.flush()
            os.fsync(f.fileno())
        return
    data_name = f"{target.name}.data"
    with atomic_write(target.parent / data_name, str(target.parent / data_name), ModelSaveError) as tmp_data:
        with open(tmp, "wb") as f, open(tmp_data, "wb") as d:
            write_external(model, f, d, data_name)
            for h in (d, f):
                h.flush()
                os.fsync(h.fileno())


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
