"""Passes: the registry, the pass manager, and the built-in passes (imported here to register)."""

from prunec.passes.base import Calibration, Pass, PassContext, PassResult, Skip, get_pass, option, register, registry
from prunec.passes.manager import PassManager, RunReport, build_passes, load_recipe
from prunec.passes import channels, cleanup, csr, fold_bn, heads, sparsity, two_four  # noqa: F401  (registration)
from prunec.passes import recalibrate, reconstruct  # noqa: F401  (registration)

__all__ = ["Calibration", "Pass", "PassContext", "PassResult", "Skip", "get_pass", "option", "register", "registry",
           "PassManager", "RunReport", "build_passes", "load_recipe"]
