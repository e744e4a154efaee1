"""Every ``labkit.open`` option, checked once, for both backends: a frozen :class:`VmOptions`.

The options come as keywords (``memory="4G"``, ``balloon={"deflate_on_oom": True}``,
``virtio_mem=[{...}]``...) or as a QEMU command line (``qemu_args="-m 4G,maxmem=20G -object ..."``,
read by :mod:`labkit.backends.options_qemu`), or both when they don't overlap. Either way the same
checks run, with QEMU's texts where QEMU has one (the property names stay QEMU's: ``deflate_on_oom``
is ``deflate-on-oom``), and the result is the same :class:`VmOptions`, which both backends build
from. Booleans are QEMU's (on/off, yes/no, true/false, y/n or a Python bool) and ids are QEMU's
(``id_wellformed``), on both backends. Limits differ per backend (:data:`LIMITS`): the model's page
arrays, the live backend's real QEMU.

>>> opts = parse_options("model", memory="1G", balloon={"deflate_on_oom": "on"})
>>> opts.memory, opts.balloon.deflate_on_oom, opts.balloon.id
(1073741824, True, 'balloon0')
>>> parse_options("model", memory="1G", balloon={"deflate_on_oom": "maybe"})
Traceback (most recent call last):
...
ValueError: balloon deflate_on_oom='maybe': Parameter 'deflate-on-oom' expects 'on' or 'off'
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from labkit.backends.options_data import (
    CMDLINE_CHECKS,
    CMDLINE_DEFAULTS,
    EPOCH,
    KEYWORDS,
    LIMITS,
    BalloonOptions,
    HostOptions,
    Limits,
    MemoryBackend,
    ModelKnobs,
    QemuKnobs,
    VirtioMemOptions,
    VirtioPmemOptions,
    VmOptions,
)
from labkit.backends.options_keywords import (
    balloon_from_keywords,
    check_fits,
    check_memory,
    check_pmem_memmap,
    cmdline_from_keywords,
    equal_node_sizes,
    host_from_keywords,
    model_from_keywords,
    qemu_from_keywords,
    virtio_mem_from_keywords,
    virtio_pmem_from_keywords,
)
from labkit.backends.options_qemu import from_command_line
from labkit.model.hotplug import ONLINE_TYPES
from labkit.units import MiB, format_size, parse_size


# --- the one entry point ------------------------------------------------------------------------
def parse_options(backend: str = "model", **keywords: Any) -> VmOptions:
    """Check every option of ``labkit.open`` once and return the :class:`VmOptions` to build from.

    ``backend`` is ``"model"`` or ``"qemu"``; ``qemu`` (the live knobs) is accepted on the live
    backend only. Raises ``TypeError`` for an unknown option and ``ValueError`` naming the value for
    a bad one, before anything is built."""
    accepted = KEYWORDS + (("qemu",) if backend == "qemu" else ())
    for name in keywords:
        if name not in accepted:
            raise TypeError(f"unknown option {name!r}; accepted: {', '.join(accepted)}"
                            + ("" if backend == "qemu" else " (and qemu=... with backend='qemu')"))
    limits = LIMITS[backend]
    seed = keywords.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    vm_name = keywords.get("vm_name", "vm0")
    if not isinstance(vm_name, str) or not vm_name:
        raise ValueError(f"vm_name must be a non-empty string, got {vm_name!r}")
    state = keywords.get("memhp_default_state", "offline")
    if state not in ONLINE_TYPES:
        raise ValueError(f"memhp_default_state {state!r} is not one of {list(ONLINE_TYPES)}")
    cmdline, kernel_params = cmdline_from_keywords(keywords.get("cmdline"))
    common = dict(backend=backend, seed=seed, vm_name=vm_name, memhp_default_state=state,
                  cmdline=cmdline, kernel_params=kernel_params,
                  model=model_from_keywords(keywords.get("model")),
                  qemu=qemu_from_keywords(keywords.get("qemu")),
                  host=host_from_keywords(keywords.get("host"), backend),
                  keywords=MappingProxyType(dict(keywords)))
    if keywords.get("qemu_args") is not None:
        opts = VmOptions(memory=0, maxmem=0, **common)
        return from_command_line(opts, keywords, limits)
    memory = keywords.get("memory", "4G")
    size = parse_size(memory, name="memory")
    check_memory(size, memory, limits)
    numa_nodes = keywords.get("numa_nodes", 1)
    if not isinstance(numa_nodes, int) or isinstance(numa_nodes, bool) or not (
            1 <= numa_nodes <= limits.max_numa_nodes) or size < numa_nodes * 128 * MiB:
        raise ValueError(f"numa_nodes must be an int from 1 to {limits.max_numa_nodes} with at least "
                         f"128 MiB per node, got {numa_nodes!r} for {format_size(size)}")
    balloon = balloon_from_keywords(keywords.get("balloon"))
    virtio_mem = virtio_mem_from_keywords(keywords.get("virtio_mem"), numa_nodes, backend)
    virtio_pmem = virtio_pmem_from_keywords(keywords.get("virtio_pmem"), {d.id for d in virtio_mem})
    check_pmem_memmap(virtio_pmem, size)
    backends = tuple(MemoryBackend(d.memdev, "memory-backend-ram", d.size, prealloc=d.prealloc)
                     for d in virtio_mem) + tuple(
        MemoryBackend(d.memdev, "memory-backend-file", d.size, share=d.share, mem_path=d.path)
        for d in virtio_pmem)
    device_memory = sum(b.size for b in backends)
    return VmOptions(memory=size, maxmem=size + device_memory, smp=common["qemu"].smp,
                     node_sizes=equal_node_sizes(size, numa_nodes),
                     node_memdevs=tuple(f"ram{node}" for node in range(numa_nodes)),  # as the live backend
                     ram_memdev="ram0" if numa_nodes == 1 else "pc.ram",
                     balloon=balloon, iothreads=(balloon.iothread,) if balloon and balloon.iothread else (),
                     memory_backends=backends, virtio_mem=virtio_mem, virtio_pmem=virtio_pmem, **common)


__all__ = ["CMDLINE_CHECKS", "CMDLINE_DEFAULTS", "EPOCH", "LIMITS", "BalloonOptions", "HostOptions",
           "Limits", "MemoryBackend", "ModelKnobs", "QemuKnobs", "VirtioMemOptions", "VirtioPmemOptions",
           "VmOptions", "check_fits", "cmdline_from_keywords", "equal_node_sizes", "parse_options"]
