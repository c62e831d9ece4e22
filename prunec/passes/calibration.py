"""Inner tensors of a graph on calibration data, for passes that score what they remove by it.

A pass gets its calibration arrays through `PassContext.data`; this runs a copy of its graph
with the tensors it asks for as extra outputs, a batch of samples at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from prunec.errors import DataError
from prunec.graph.ir import export_graph


def capture(graph: gs.Graph, names: list[str], data: dict[str, np.ndarray] | None, *, what: str,
            batch: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Yield {name: value} for the tensors `names` of `graph`, batch by batch over `data`.

    `what` names the option that needs the data, for the error when there is none."""
    from prunec.runtime.session import make_session, run_session

    if not data:
        raise DataError(f"{what} needs calibration data (--data file.npz)")
    g = graph.copy()
    tensors = g.tensors()
    extra = [tensors[n] for n in dict.fromkeys(names) if n in tensors and tensors[n] not in g.outputs]
    for t in extra:
        if t.dtype is None:
            t.dtype = np.float32  # activations read by weight layers are float
    g.outputs = list(g.outputs) + extra
    model = export_graph(g)
    sess = make_session(model)
    wanted = {i.name for i in sess.get_inputs()}
    feeds_all = {k: v for k, v in data.items() if k in wanted}
    if len(feeds_all) != len(wanted):
        raise DataError(f"calibration data lacks arrays for the model inputs {sorted(wanted - set(feeds_all))}")
    n = len(next(iter(feeds_all.values())))
    for start in range(0, n, batch):
        feeds = {k: v[start:start + batch] for k, v in feeds_all.items()}
        outs = run_session(sess, feeds)
        yield {k: outs[k] for k in names if k in outs}
