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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

#: Everything counted since the process started.
TOTALS: Counter = Counter()

#: What is counted, for documentation and for reports.
KINDS = ("import", "export", "export_skeleton", "serialize", "materialize", "weights_written",
         "shape_inference", "checker", "session", "fold")


def count(kind: str, n: int = 1) -> None:
    """Record `n` more of `kind` (one of KINDS)."""
    TOTALS[kind] += n


class Since(Mapping):
    """What was counted since this object was made (read live: counts keep growing)."""

    def __init__(self) -> None:
        self._start = Counter(TOTALS)

    def __getitem__(self, kind: str) -> int:
        return TOTALS[kind] - self._start[kind]

    def __iter__(self) -> Iterator[str]:
        return iter([k for k in TOTALS if self[k]])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return f"Since({dict(self)})"


@contextmanager
def counting() -> Iterator[Since]:
    """Yield the counts of the block (read them inside it or after it)."""
    yield Since()
