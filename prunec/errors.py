"""User-facing failures. Each carries a one-line message a user can act on and an exit code.

The CLI maps these to `prunec: error: <message>` and the exit code; anything else that escapes
is a bug in prunec and is allowed to show its traceback.
"""

from __future__ import annotations


class PrunecError(Exception):
    """Base of every error caused by the user's input rather than by a bug in prunec."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # keep it to one line whatever the cause said
        return " ".join(self.message.split())


class ModelLoadError(PrunecError):
    """The input model cannot be read: missing, not ONNX, truncated, missing external data."""


class OutputFileError(PrunecError):
    """An output file cannot be written: not a regular file, an unwritable folder, a full disk."""


class ModelSaveError(OutputFileError):
    """The output model cannot be written where asked (e.g. it would overwrite the input)."""


class OptionError(PrunecError):
    """An unknown pass, option, or a value that does not parse."""


class InputShapeError(PrunecError):
    """Input shapes cannot be resolved for running the model (symbolic dims, bad --input-shape)."""


class VerificationError(PrunecError):
    """A rewritten model failed verification: checker, shape inference, runtime or numerics.
    `details` says what failed, as JSON-able data (for `prunec run --keep-failed`)."""

    exit_code = 4

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class UnsupportedOpError(PrunecError):
    """A pass met something it cannot handle safely and the caller asked it to fail, not freeze."""


class ModelRunError(PrunecError):
    """ONNX Runtime cannot run the model on the inputs prunec made (often an input that needs a
    real value: --feed)."""


class DataError(PrunecError):
    """Calibration or evaluation data does not match the model."""


class ProviderError(PrunecError):
    """An ONNX Runtime execution provider was asked for but is not available."""


class RuntimeUnavailableError(ProviderError):
    """A runtime (ORT, OpenVINO, TensorRT), device or precision was asked for but is not available here."""


class GateFailure(PrunecError):
    """An accuracy gate failed; the build must not ship the model."""

    exit_code = 3


class BudgetTooLossy(PrunecError):
    """A --budget plan's predicted metric drop exceeds --max-drop; the plan is not written."""

    exit_code = 3


class BreakingChange(PrunecError):
    """A rewrite changed the model's interface (an input or output name, dtype or shape)."""

    exit_code = 5


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived (SIGINT stays KeyboardInterrupt). A BaseException, like
    KeyboardInterrupt, so that only cleanup code (`finally`, `except BaseException`) sees it."""

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum = signum
        self.name = name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it."""
        return 128 + self.signum
