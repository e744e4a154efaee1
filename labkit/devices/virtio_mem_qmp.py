"""virtio-mem on a model backend: devices and drivers from the options, and their QMP surface.

``labkit.open(virtio_mem=[{"id": "vm0", "size": "16G", "node": 0, "requested_size": 0,
"block_size": "2M"}], memhp_default_state="online_movable")`` gives each device a
``memory-backend-ram`` of ``size`` (QOM ``/objects/mem-<id>``), a region in guest memory, the QEMU
device and the Linux driver. QMP: ``qom-get``/``qom-set`` of ``requested-size``, ``size``,
``block-size``, ``node``, ``memaddr``; ``query-memory-devices``; ``human-monitor-command`` with
``info memory-devices``; ``MEMORY_DEVICE_SIZE_CHANGE`` events. Guest ops: ``memory_blocks`` (like
``lsmem``) and ``online_memory`` (``echo online_movable > /sys/devices/system/memory/memoryN/state``).
"""

from __future__ import annotations

import numpy as np

from labkit.backends.base import check_arguments
from labkit.backends.qom import QomObject
from labkit.devices.virtio_mem import VirtioMemDevice, info_memory_devices
from labkit.devices.virtio_mem_driver import SbmState, VirtioMemDriver
from labkit.errors import QMPError
from labkit.units import PAGE_SIZE


class VirtioMem:
    """All virtio-mem devices of one VM (``backend.virtio_mem``)."""

    def __init__(self, backend):
        self.backend = backend
        self.devices: list[VirtioMemDevice] = []
        self.drivers: list[VirtioMemDriver] = []
        kernel = backend.kernel
        for spec, region in zip(backend.virtio_mem_specs, backend.regions, strict=True):
            def discard(offset: int, size: int, region=region) -> int:
                a = region.start + offset // PAGE_SIZE
                pfns = np.arange(a, a + size // PAGE_SIZE, dtype=np.int64)
                return backend.host.discard(kernel.host_vm, pfns)

            device = VirtioMemDevice(spec["id"], region.memaddr, spec["size"],
                                     spec["block_size"], spec["node"], spec["requested_size"],
                                     discard=discard, busy=self._migration_running,
                                     emit=backend._events.emit, prealloc=spec["prealloc"])
            driver = VirtioMemDriver(backend.env, kernel, device, region, kernel.hotplug)
            self.devices.append(device)
            self.drivers.append(driver)
            self._qom(device)
        backend.register_qmp("query-memory-devices", self._query_memory_devices)
        backend.register_qmp("human-monitor-command", self._hmp)
        backend.register_guest_op("memory_blocks", self._memory_blocks)
        backend.register_guest_op("online_memory", self._online_memory)
        backend.sample_hooks.append(self._sample)

    def _migration_running(self) -> bool:
        """QEMU's migration_is_running(): setup, active or cancelling (virtio_mem_is_busy)."""
        from labkit.model.migration import RUNNING_STATES

        migration = getattr(self.backend, "migration", None)
        return migration is not None and getattr(migration, "status", "none") in RUNNING_STATES

    def _qom(self, d: VirtioMemDevice) -> None:
        obj = self.backend.qom.add(QomObject(d.qom_path, "virtio-mem-pci", (d.id,)))
        obj.add("requested-size", "size", lambda: d.requested_size, d.set_requested_size)
        obj.add("size", "size", lambda: d.size)

        def no_change(value, name="block-size"):
            raise ValueError(f"'{name}' cannot be changed")

        obj.add("block-size", "size", lambda: d.block_size, no_change)
        obj.add("node", "uint32", lambda: d.config.node_id)
        obj.add("memaddr", "uint64", lambda: d.config.addr)
        obj.add("memdev", "str", lambda: f"/objects/mem-{d.id}")

    def _query_memory_devices(self, **args) -> list:
        check_arguments(args, {}, {})
        return [d.device_info(f"/objects/mem-{d.id}") for d in self.devices]

    def _hmp(self, **args) -> str:
        check_arguments(args, {"command-line": str}, {"cpu-index": int})
        line = args["command-line"].strip()
        if line == "info memory-devices":
            return info_memory_devices(self.devices, {d.id: f"/objects/mem-{d.id}"
                                                      for d in self.devices})
        raise QMPError("GenericError", f"the model's monitor answers only 'info memory-devices', "
                                       f"got {line!r}")

    def _sample(self) -> dict:
        return {"virtio_mem_plugged": sum(d.size for d in self.devices),
                "virtio_mem_requested": sum(d.requested_size for d in self.devices)}

    # --- guest side -----------------------------------------------------------------------------
    def _memory_blocks(self) -> list[dict]:
        """Hot-pluggable memory blocks as ``lsmem`` would list them, with the driver's view."""
        out = []
        for drv in self.drivers:
            for mb in range(drv.next_mb):
                block = drv.first_mb + mb
                units = drv.plugged[drv.mb_units(mb)] if not drv.bbm else drv.plugged[
                    mb // drv.mbs_per_unit: mb // drv.mbs_per_unit + 1]
                out.append({"device": drv.device.id, "block": block,
                            "state": SbmState(int(drv.mb_state[mb])).name.lower(),
                            "zone": drv.hotplug.online_blocks.get(block),
                            "plugged": int(units.sum()) * drv.unit_bytes // max(
                                1, drv.mbs_per_unit)})
        return out

    def _online_memory(self, block: int | str = "all", zone: str = "movable") -> int:
        """Online added-but-offline blocks into ZONE_MOVABLE ("movable") or ZONE_NORMAL
        ("kernel"); returns how many were onlined."""
        if zone not in ("movable", "kernel"):
            raise ValueError(f"zone {zone!r} is not one of ['movable', 'kernel']")
        done = 0
        for drv in self.drivers:
            for mb in range(drv.next_mb):
                b = drv.first_mb + mb
                if (block == "all" or block == b) and b in drv.hotplug.memmap and (
                        drv.mb_online_zone(mb) is None):
                    drv.online_block(mb, zone == "movable")
                    done += 1
            drv.memory_notify_online()
        if done == 0 and block != "all":
            raise ValueError(f"memory block {block!r} is not an added, offline block")
        return done


def attach(backend):
    """Create the virtio-mem devices the options ask for."""
    if not getattr(backend, "virtio_mem_specs", None):
        return None
    return VirtioMem(backend)

