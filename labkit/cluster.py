"""Run many notebooks at once through dask.distributed: what ``labkit grade`` and ``labkit regress``
share.

:func:`run_tasks` maps a function over tasks on a Dask cluster and returns one result per task, in
the order given. By default it starts a :class:`distributed.LocalCluster` on 127.0.0.1 with one
single-threaded worker process per core of this machine (a notebook's kernel is a process of its
own, so one notebook per worker keeps the machine busy without oversubscribing it); with
``scheduler="tcp://host:8786"`` it uses an existing cluster instead (its workers need labkit and a
Jupyter kernel installed, and must see the files the tasks name). Progress is reported as each task
completes, not in submission order. A task that raises or whose worker dies is run once more; if
it fails again it becomes a result built by ``on_error(task, message)``: one failing notebook never
stops the rest.

>>> run_tasks(len, [[1], [1, 2]], workers=1, progress=None)  # doctest: +SKIP
[1, 2]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per core this process may run on (at least one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def client(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` (an address such as
    ``tcp://10.0.0.5:8786``), else to a new LocalCluster of ``workers`` processes (default: one per
    core) listening on 127.0.0.1 only, without a dashboard. The local cluster is closed on exit."""
    from distributed import Client, LocalCluster

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise ValueError(f"scheduler must be an address such as tcp://host:8786, got {scheduler!r}")
        try:
            with Client(scheduler, timeout="20s") as c:
                yield c
        except OSError as e:
            raise ValueError(f"cannot reach the Dask scheduler at {scheduler!r}: {e}") from None
        return
    n = workers or default_workers()
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as c:
        yield c


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], *, scheduler: str | None = None,
              workers: int | None = None, label: Callable[[T], str] = str,
              describe: Callable[[R], str] = lambda result: "done",
              on_error: Callable[[T, str], R] | None = None,
              progress: Callable[[str], None] | None = print) -> list[R]:
    """``[fn(task) for task in tasks]``, computed on a Dask cluster (see :func:`client`).

    As each task completes, ``progress`` gets a line ``[k/n] <label(task)>: <describe(result)>
    (<seconds> s)``. A task that raised (or whose worker died) gives ``on_error(task, message)``;
    without ``on_error`` the first such error is raised once every task has finished."""
    from distributed import as_completed

    tasks = list(tasks)
    if not tasks:
        return []
    results: list[Any] = [None] * len(tasks)
    errors: list[tuple[int, str]] = []
    start = time.monotonic()
    with client(scheduler, workers) as c:
        # pure=False: two identical tasks (the same notebook twice) are two runs, not one;
        # retries=1: a task that failed (it raised, or its worker process died) runs once more
        futures = c.map(fn, tasks, pure=False, retries=1)
        index = {f.key: i for i, f in enumerate(futures)}
        for done, future in enumerate(as_completed(futures), start=1):
            i = index[future.key]
            try:
                results[i] = future.result()
                text = describe(results[i])
            except Exception as e:  # noqa: BLE001 - one task's failure never stops the others
                message = f"{type(e).__name__}: {e}"
                errors.append((i, message))
                results[i] = on_error(tasks[i], message) if on_error is not None else None
                text = f"failed ({message[:200]})"
            if progress is not None:
                progress(f"[{done}/{len(tasks)}] {label(tasks[i])}: {text} "
                         f"({time.monotonic() - start:.1f} s)")
    if errors and on_error is None:
        i, message = errors[0]
        raise RuntimeError(f"{label(tasks[i])}: {message}")
    return results


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send this process's file descriptor 2 (which the kernel inherits) to ``path``: the kernel's
    own warnings and dying words go to a log of the task's own, not to the grader's terminal. A worker
    runs one task at a time, so nothing else writes there meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def stderr_progress(line: str) -> None:
    """Progress lines go to stderr, so a command's stdout stays machine-readable."""
    print(line, file=sys.stderr, flush=True)
