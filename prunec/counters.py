"""Counts of the expensive things a run does to a model, so tests can assert on them.

A model crosses between Python and the outside world in a few ways, each costing time and,
for big models, memory: importing a protobuf into the editable graph (`import`), exporting the
graph back (`export`; without weights, for shape work: `export_skeleton`), serializing a whole
model with its weights (`serialize`), building a whole ModelProto back from files
(`materialize`), writing weights to a file (`weights_written`, in bytes), ONNX shape inference
(`shape_inference`), the ONNX checker (`checker`), ONNX Runtime sessions (`session`) and
constant folding (`fold`). The places that do these call `count`; `counting()` gives the counts
of one block of code:

    with counting() as c:
        PassManager(passes).run(model)
    assert c["serialize"] == 0

Counting is a dict update per event, cheap enough to stay on always.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

#: Everything counted since the process started.
TOTALS: Counter = Counter()

#: What is counted, for documentation and for reports.
KINDS = ("import", "export", "export_skeleton", "serialize", "materialize", "weights_written",
         "shape_inference", "checker", "session", "fold")


def count(kind: str, n: int = 1) -> None:
    """Record `n` more of `kind` (one of KINDS)."""
    TOTALS[kind] += n


@contextmanager
def counting() -> Iterator[Counter]:
    """Yield a Counter that, when the block ends, holds what the block counted."""
    start = Counter(TOTALS)
    result: Counter = Counter()
    try:
        yield result
    finally:
        result.update({k: v - start.get(k, 0) for k, v in TOTALS.items() if v != start.get(k, 0)})
