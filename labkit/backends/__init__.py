"""Backends: the same interface over the numpy model and (optionally) a real QEMU guest."""

from __future__ import annotations

from typing import Any

from labkit.backends.base import Backend
from labkit.backends.model import ModelBackend
from labkit.backends.options import VmOptions, parse_options

BACKENDS = ("model", "qemu")


def open(backend: str = "model", **options: Any) -> Backend:  # noqa: A001 - labkit.open, like io.open
    """Open a VM on a backend.

    Options (the same for every backend, checked once by
    :func:`labkit.backends.options.parse_options`): ``memory`` (bytes or "4G"), ``seed``, ``balloon``
    (QEMU virtio-balloon properties with underscores: ``deflate_on_oom``, ``free_page_reporting``,
    ``free_page_hint``, ``page_poison``, ``iothread``; ``False`` for no balloon), ``host`` (``ram``,
    ``swap``, ``discard``, ``swapin_us``, or a shared :class:`labkit.model.host.Host`), ``numa_nodes``,
    ``cmdline`` (guest kernel parameters), ``vm_name``, ``virtio_mem``, ``virtio_pmem``,
    ``memhp_default_state``, ``model`` (model-only knobs: ``balloon_request_ms``, ``boot``,
    ``epoch``) and ``qemu_args``: a QEMU command line (a string or a list), e.g. ``"-m 4G,maxmem=20G
    -object memory-backend-ram,id=mem0,size=16G -device virtio-mem-pci,id=vm0,memdev=mem0,node=0"``,
    read with QEMU's syntax and texts (:mod:`labkit.backends.options_qemu`). ``backend="qemu"`` boots
    a real Linux guest under QEMU with the same options (the command line is passed to QEMU as
    given), plus ``qemu`` (``accel``, ``kernel``, ``thp``, ``boot_timeout_s``, ``smp``, ...).

    >>> import labkit
    >>> vm = labkit.open(memory="1G", seed=1)
    >>> vm.meminfo()["MemTotal"] < 1 << 20
    True
    >>> vm.close()
    >>> vm = labkit.open(qemu_args="-m 1G -device virtio-balloon-pci,id=balloon0,deflate-on-oom=on")
    >>> vm.qmp("qom-get", path="balloon0", property="deflate-on-oom")
    True
    >>> vm.close()
    """
    if backend == "model":
        return ModelBackend(parse_options("model", **options))
    if backend == "qemu":  # a real QEMU and Linux guest (labkit.backends.qemu); same options
        from labkit.backends.qemu import open_qemu

        return open_qemu(parse_options("qemu", **options))
    raise ValueError(f"backend {backend!r} is not available; accepted: {list(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "ModelBackend", "VmOptions", "open", "parse_options"]
