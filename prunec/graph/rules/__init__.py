"""One channel rule per ONNX op family, in one module per family. Importing this package
registers them all. A rule sees the node, reads its input labels, writes output labels, and
records unions, weight sites and fix-ups on the walker; an op without a rule freezes.
Adding an op means adding one rule in its family's module and a test model."""

from prunec.graph.rules import (activations, attention, embeddings, indexing, normalization,  # noqa: F401
                                pointwise, quantized, recurrent, shape_ops, weights)
