"""Resizing a NUMA guest: which node the memory leaves (the resize job's NUMA row, notebook 08).

A guest with two NUMA nodes is shrunk by ``shrink`` twice, on fresh guests of the same size:

* **balloon**: QEMU's ``balloon`` command names no node; the driver allocates its pages with
  ``alloc_page`` (drivers/virtio/virtio_balloon.c ``balloon_page_alloc``), which follows the
  allocating task's memory policy and falls back along the zonelist: the pages come from whichever
  node the allocator prefers, not from a node the host chose (docs/mechanisms.md §1.2).
* **virtio-mem**: one device per node (``-device virtio-mem-pci,node=N``, §5.1); shrinking the device
  of node 1 takes memory from node 1 only.

What is measured is each node's free memory before and after (``inspect("memory")``): the memory the
shrink took from that node (a node can gain a little: the struct pages of removed memory blocks,
allocated from node 0's ZONE_NORMAL in this model, are freed with them).

>>> r = resize_numa(ResizeNumaParams(node_memory="512M", shrink="128M"))
>>> r["virtio-mem"]["taken"][1] == 128 << 20, r["virtio-mem"]["taken"][0] <= 0
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import labkit
from labkit.units import GiB, MiB, format_size, parse_size


@dataclass(frozen=True)
class ResizeNumaParams:
    """Two nodes of ``node_memory`` boot RAM each; virtio-mem devices of ``node_memory`` per node,
    plugged at boot; ``shrink`` is taken away once."""

    node_memory: int | str = 1 * GiB
    shrink: int | str = 256 * MiB
    seed: int = 0
    settle_ms: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("node_memory", "shrink"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name=name))
        if self.node_memory < 256 * MiB or self.node_memory % (128 * MiB):
            raise ValueError(f"node_memory must be a multiple of 128 MiB, at least 256 MiB, got "
                             f"{format_size(self.node_memory)}")
        if not 0 < self.shrink < self.node_memory or self.shrink % (2 * MiB):
            raise ValueError(f"shrink must be a multiple of 2 MiB below node_memory, got "
                             f"{format_size(self.shrink)}")


def _free_by_node(vm) -> dict[int, int]:
    out: dict[int, int] = {}
    for z in vm.inspect("memory").zones:
        # free pages: on the buddy lists and on the per-CPU lists (which alloc_page takes first)
        out[z["node"]] = out.get(z["node"], 0) + (z["free"] + z.get("pcp", 0)) * 4096
    return out


def resize_numa(params: ResizeNumaParams | None = None) -> dict[str, dict]:
    """Per mechanism: ``taken`` (bytes of free memory the shrink took from each node) and ``asked``
    (the node the host aimed at, None for the balloon, which cannot aim)."""
    p = params or ResizeNumaParams()
    out: dict[str, dict] = {}
    with labkit.open(backend="model", memory=2 * (p.node_memory + p.node_memory), numa_nodes=2, seed=p.seed,
                     balloon={}, model={"boot": "minimal"}) as vm:
        before = _free_by_node(vm)
        vm.qmp("balloon", value=4 * p.node_memory - p.shrink)
        vm.advance(p.settle_ms)
        after = _free_by_node(vm)
        out["balloon"] = {"taken": {n: before[n] - after[n] for n in sorted(before)}, "asked": None,
                          "removed": 4 * p.node_memory - vm.qmp("query-balloon")["actual"]}
    devices = [{"id": f"vm{n}", "size": p.node_memory, "node": n, "requested_size": p.node_memory}
               for n in (0, 1)]
    with labkit.open(backend="model", memory=2 * p.node_memory, numa_nodes=2, seed=p.seed, balloon=False,
                     memhp_default_state="online_movable", virtio_mem=devices,
                     model={"boot": "minimal"}) as vm:
        vm.advance(p.settle_ms)
        before = _free_by_node(vm)
        vm.qmp("qom-set", path="vm1", property="requested-size", value=p.node_memory - p.shrink)
        vm.advance(p.settle_ms)
        after = _free_by_node(vm)
        out["virtio-mem"] = {"taken": {n: before[n] - after[n] for n in sorted(before)}, "asked": 1,
                             "removed": p.node_memory - int(vm.qmp("qom-get", path="vm1", property="size"))}
    return out


__all__ = ["ResizeNumaParams", "resize_numa"]
