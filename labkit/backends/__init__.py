"""Backends: the same interface over the numpy model and (optionally) a real QEMU guest."""

from __future__ import annotations

from typing import Any

from labkit.backends.base import Backend
from labkit.backends.model import ModelBackend

BACKENDS = ("model", "qemu")


def open(backend: str = "model", **options: Any) -> Backend:  # noqa: A001 - labkit.open, like io.open
    """Open a VM on a backend.

    Options (the same for every backend): ``memory`` (bytes or "4G"), ``seed``, ``balloon`` (QEMU
    virtio-balloon properties with underscores: ``deflate_on_oom``, ``free_page_reporting``,
    ``free_page_hint``, ``page_poison``, ``iothread``; ``False`` for no balloon), ``host``
    (``ram``, ``swap``, ``discard``, ``swapin_us``, or a shared :class:`labkit.model.host.Host`),
    ``numa_nodes``, and ``model`` (model-only knobs: ``balloon_request_ms``, ``boot``,
    ``initrd_bytes``, ``epoch``).
    ``backend="qemu"`` boots a real Linux guest under QEMU with the same options, plus ``qemu``
    (``accel``, ``kernel``, ``thp``, ``boot_timeout_s``, ``smp``, ``extra_args``, ...).

    >>> import labkit
    >>> vm = labkit.open(memory="1G", seed=1)
    >>> vm.meminfo()["MemTotal"] < 1 << 20
    True
    >>> vm.close()
    """
    if backend == "model":
        return _opened(ModelBackend, options, "model")
    if backend == "qemu":  # a real QEMU and Linux guest (labkit.backends.qemu); same options
        from labkit.backends.qemu import open_qemu

        return _opened(open_qemu, options, "qemu")
    raise ValueError(f"backend {backend!r} is not available; accepted: {list(BACKENDS)}")


def _opened(factory, options: dict, extra: str) -> Backend:
    """Call a backend's constructor; an unknown keyword becomes an error listing what is accepted."""
    try:
        return factory(**options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            name = str(e).split("'")[1]
            raise TypeError(
                f"unknown option {name!r}; accepted: memory, seed, balloon, host, numa_nodes, "
                f"cmdline, vm_name, virtio_mem, virtio_pmem, memhp_default_state, {extra}") from None
        raise


__all__ = ["BACKENDS", "Backend", "ModelBackend", "open"]
