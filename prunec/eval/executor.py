"""Where independent trials run: in this process, on a local process pool, or on a Ray cluster.

Every executor builds one worker per process from the same spec (the model and data are sent
once and loaded once per worker), hands tasks out in the order given to whichever worker is
free, and returns the results in that order. A worker's answer depends on its task alone, so the
results are the same whatever the executor and the number of workers. `on_result` sees each
result as it arrives (the sensitivity cache is written there, by this process only).

Ray is optional (`pip install 'prunec[cluster]'`): `--executor ray` starts a local Ray instance,
or joins a running cluster with `--address` (`ray://host:10001` or `auto`); no scheduler of our own.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from prunec.errors import ExecutorError, OptionError

EXECUTORS = ("local", "ray")

#: Result callback: (index of the task, its result).
OnResult = Callable[[int, Any], None]


@dataclass
class ExecutorSettings:
    """How trials are spread: `jobs` workers on the `kind` executor (`address`: a Ray cluster).
    `jobs` None means 1 locally and every cluster CPU on Ray; 0 means every core or cluster CPU."""

    jobs: int | None = None
    kind: str = "local"
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise OptionError(f"--executor {self.kind!r}: choose one of {', '.join(EXECUTORS)}")
        if self.jobs is not None and self.jobs < 0:
            raise OptionError(f"--jobs {self.jobs}: must be 0 (one per core) or more")
        if self.address and self.kind != "ray":
            raise OptionError("--address names a Ray cluster; use it with --executor ray")

    def workers(self) -> int:
        """How many workers (on Ray, call this once Ray is initialised)."""
        if self.jobs:
            return self.jobs
        if self.kind == "local" and self.jobs is None:
            return 1
        if self.kind == "ray":
            import ray

            return max(1, int(ray.cluster_resources().get("CPU", 1)))
        return os.cpu_count() or 1


def run_tasks(make_worker: Callable[[Any, int | None], Callable[[Any], Any]], spec: Any, tasks: list[Any],
              settings: ExecutorSettings | None = None, on_result: OnResult | None = None) -> list[Any]:
    """Results of `make_worker(spec, threads)(task)` for every task, in task order.

    `make_worker` must be a module-level function (it is sent to worker processes by name);
    `threads` is the compute threads the worker should use (None: all of this machine's)."""
    settings = settings or ExecutorSettings()
    if not tasks:
        return []
    if settings.kind == "ray":
        return _run_ray(make_worker, spec, tasks, settings, on_result)
    n = min(settings.workers(), len(tasks))
    if n <= 1:
        worker = make_worker(spec, None)
        results = []
        for i, t in enumerate(tasks):
            results.append(worker(t))
            if on_result:
                on_result(i, results[-1])
        return results
    return _run_pool(make_worker, spec, tasks, n, on_result)


# -- local process pool

_WORKER: Callable[[Any], Any] | None = None


def _init_worker(make_worker, spec, threads) -> None:
    global _WORKER
    _WORKER = make_worker(spec, threads)


def _call(task):
    return _WORKER(task)


def _run_pool(make_worker, spec, tasks, n: int, on_result: OnResult | None) -> list[Any]:
    # spawn, not fork: a forked child would inherit ONNX Runtime's threads in an unknown state.
    ctx = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(tasks)
    threads = max(1, (os.cpu_count() or 1) // n)  # the cores shared out, not oversubscribed
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                             initargs=(make_worker, spec, threads)) as pool:
        # Submit only as workers free up, so tasks start in order on whichever worker is idle.
        pending = {}
        nxt = 0
        while nxt < len(tasks) or pending:
            while nxt < len(tasks) and len(pending) < n:
                pending[pool.submit(_call, tasks[nxt])] = nxt
                nxt += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                results[i] = fut.result()
                if on_result:
                    on_result(i, results[i])
    return results


# -- Ray

class _RayWorker:
    """A Ray actor holding one worker built from the spec."""

    def __init__(self, make_worker, spec):
        self.worker = make_worker(spec, 1)  # each actor reserves one CPU

    def run(self, i, task):
        return i, self.worker(task)


def _run_ray(make_worker, spec, tasks, settings: ExecutorSettings, on_result: OnResult | None) -> list[Any]:
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'prunec[cluster]'") from None
    started = False
    if not ray.is_initialized():
        try:
            if settings.address:
                ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False)
                started = True
        except Exception as exc:  # noqa: BLE001  (Ray raises many types: ConnectionError, RuntimeError...)
            where = settings.address or "a local instance"
            raise ExecutorError(f"cannot start or reach Ray at {where}: {exc}") from None
    try:
        n = min(settings.workers(), len(tasks))
        ref = ray.put(spec)
        actor = ray.remote(num_cpus=1)(_RayWorker)
        workers = [actor.remote(make_worker, ref) for _ in range(n)]
        results: list[Any] = [None] * len(tasks)
        idle = list(workers)
        pending = {}
        nxt = 0
        while nxt < len(tasks) or pending:
            while nxt < len(tasks) and idle:
                w = idle.pop(0)
                pending[w.run.remote(nxt, tasks[nxt])] = w
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref_done in done:
                w = pending.pop(ref_done)
                idle.append(w)
                i, res = ray.get(ref_done)
                results[i] = res
                if on_result:
                    on_result(i, res)
        for w in workers:
            ray.kill(w)
        return results
    finally:
        if started:
            ray.shutdown()
