"""virtio-mem on one model VM: its devices (QEMU) and drivers (Linux), and its guest ops.

``labkit.open(virtio_mem=[{"id": "vm0", "size": "16G", "node": 0, "requested_size": 0,
"block_size": "2M"}], memhp_default_state="online_movable")`` (or the QEMU line ``-m 4G,maxmem=20G
-object memory-backend-ram,id=mem0,size=16G -device virtio-mem-pci,id=vm0,memdev=mem0,node=0``)
gives each device a memory backend, a region in guest memory, the QEMU device and the Linux driver.
The machine builds :class:`VirtioMem` from explicit arguments; its QMP and HMP surface
(``qom-get``/``qom-set`` of ``requested-size``..., ``query-memory-devices``, ``info
memory-devices``) is the monitor's, from the device's declared QOM properties. Guest ops:
``memory_blocks`` (like ``lsmem``) and ``online_memory`` (``echo online_movable >
/sys/devices/system/memory/memoryN/state``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import simpy

from labkit.devices.virtio_mem import VirtioMemDevice
from labkit.devices.virtio_mem_driver import SbmState, VirtioMemDriver
from labkit.model.host import Host
from labkit.model.hotplug import DeviceRegion
from labkit.model.kernel import Kernel
from labkit.units import PAGE_SIZE


class VirtioMem:
    """All virtio-mem devices of one VM (``vm.virtio_mem``): ``devices`` (QEMU) and ``drivers``
    (Linux), one per ``specs`` entry (device properties, sizes in bytes, ``memdev`` the backend's
    id) on its ``regions`` entry. ``busy`` is QEMU's ``migration_is_running``; ``emit`` sends QMP
    events."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, host: Host, specs: Sequence[dict],
                 regions: Sequence[DeviceRegion], busy: Callable[[], bool],
                 emit: Callable[[str, dict], None]):
        self.devices: list[VirtioMemDevice] = []
        self.drivers: list[VirtioMemDriver] = []
        for spec, region in zip(specs, regions, strict=True):
            def discard(offset: int, size: int, region=region) -> int:
                a = region.start + offset // PAGE_SIZE
                pfns = np.arange(a, a + size // PAGE_SIZE, dtype=np.int64)
                return host.discard(kernel.host_vm, pfns)

            device = VirtioMemDevice(spec["id"], region.memaddr, spec["size"], spec["block_size"],
                                     spec["node"], spec["requested_size"], discard=discard, busy=busy,
                                     emit=emit, prealloc=spec["prealloc"], memdev=spec.get("memdev"))
            driver = VirtioMemDriver(env, kernel, device, region, kernel.hotplug)
            self.devices.append(device)
            self.drivers.append(driver)

    def sample(self) -> dict:
        """Extra ``vm.sample()`` columns, in bytes."""
        return {"virtio_mem_plugged": sum(d.size for d in self.devices),
                "virtio_mem_requested": sum(d.requested_size for d in self.devices)}

    # --- guest side -----------------------------------------------------------------------------
    def memory_blocks(self) -> list[dict]:
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

    def online_memory(self, block: int | str = "all", zone: str = "movable") -> int:
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

