"""virtio-mem, QEMU side: the device's config, its plugged-block bitmap and request handling.

Faithful to hw/virtio/virtio-mem.c (QEMU 8.2-9.x) as read for docs/mechanisms.md §5.1-§5.2:

* ``block_size`` defaults to the host THP size, 2 MiB on x86-64; at least ``VIRTIO_MEM_MIN_BLOCK_SIZE``
  (1 MiB) and a power of two; ``requested-size``, ``memaddr`` and the memdev size are multiples of it.
* ``usable_region_size = ALIGN_UP(min(memdev size, requested + VIRTIO_MEM_USABLE_EXTENT), block)``
  (256 MiB on x86), 0 when nothing is requested; it grows on a request but shrinks only on UNPLUG_ALL
  or a system reset.
* PLUG / UNPLUG of ``nb_blocks`` at ``addr``: ERROR unless block-aligned inside the usable region and
  every block in the opposite state; NACK when a plug would exceed ``requested_size``; BUSY while a
  migration runs (``virtio_mem_is_busy``). Unplug discards the range on the host (RSS falls); plug only
  flips the bitmap (no preallocation unless ``prealloc=on``).
* Every ``qom-set requested-size`` raises a config interrupt, even with an unchanged value, and QEMU's
  own error texts are kept to the letter (including the missing space in "size(0x...)").
* MEMORY_DEVICE_SIZE_CHANGE after every ACKed plug/unplug and UNPLUG_ALL (the monitor throttles it to one
  per second per qom-path).

The guest-side driver lives in :mod:`labkit.devices.virtio_mem_driver`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from labkit.devices.properties import QomProperty
from labkit.units import GiB, MiB, PAGE_SHIFT

VIRTIO_MEM_MIN_BLOCK_SIZE = 1 * MiB  # hw/virtio/virtio-mem.c
VIRTIO_MEM_DEFAULT_BLOCK_SIZE = 2 * MiB  # THP size probed on x86-64 hosts
VIRTIO_MEM_USABLE_EXTENT = 2 * 128 * MiB  # x86: two memory sections
VIRTIO_MEM_QUEUE_SIZE = 128
# include/uapi/linux/virtio_mem.h
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2
NB_BLOCKS_MAX = 0xFFFF  # nb_blocks is a u16


class Request(enum.IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class Response(enum.IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(enum.IntEnum):
    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


PROPERTY_DEFAULTS = {
    "id": None,
    "size": None,  # the memory backend's size (memory-backend-ram,size=...)
    "node": 0,
    "requested_size": 0,
    "block_size": VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
    "prealloc": False,
    "unplugged_inaccessible": "on",
    "dynamic_memslots": False,
    "memaddr": None,  # assigned by the machine when not given
}


def check_block_size(value: int) -> None:
    """virtio_mem_set_block_size's checks and texts."""
    if value < VIRTIO_MEM_MIN_BLOCK_SIZE:
        raise ValueError(f"'block-size' property has to be at least 0x{VIRTIO_MEM_MIN_BLOCK_SIZE:x}")
    if value & (value - 1):
        raise ValueError("'block-size' property has to be a power of two")


@dataclass
class MemConfig:
    """struct virtio_mem_config (all little-endian)."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int = 0
    plugged_size: int = 0
    requested_size: int = 0


class VirtioMemDevice:
    """One virtio-mem-pci device: config space, plugged bitmap, requests, QOM view."""

    def __init__(self, dev_id: str, addr: int, region_size: int, block_size: int, node: int,
                 requested_size: int, *, discard: Callable[[int, int], int],
                 busy: Callable[[], bool], emit: Callable[[str, dict], None],
                 config_changed: Callable[[], None] | None = None, prealloc: bool = False,
                 memdev: str | None = None):
        check_block_size(block_size)
        for name, value in (("requested-size", requested_size), ("memaddr", addr)):
            if value % block_size:
                raise ValueError(f"'{name}' property has to be multiples of 'block-size' "
                                 f"(0x{block_size:x})")
        if region_size % block_size:
            raise ValueError(f"'memdev' property memdev size has to be multiples of'block-size' "
                             f"(0x{block_size:x})")
        if requested_size > region_size:
            raise ValueError(f"'requested-size' cannot exceed the memory backend size"
                             f"(0x{region_size:x})")
        self.id = dev_id
        self.memdev = memdev if memdev is not None else f"mem-{dev_id}"  # its memory backend's id
        self.qom_path = f"/machine/peripheral/{dev_id}"
        self.config = MemConfig(block_size, node, addr, region_size)
        self.bitmap = np.zeros(region_size // block_size, dtype=bool)
        self.prealloc = prealloc
        self._discard = discard  # (gpa offset in the region, size) -> backed bytes freed
        self._busy = busy
        self._emit = emit
        self.config_changed = config_changed  # the guest driver's config interrupt
        self.requests = {r: 0 for r in Request}
        self.responses = {r: 0 for r in Response}
        self._resize_usable_region(requested_size, can_shrink=True)
        self.config.requested_size = requested_size

    # --- properties as QMP sees them ----------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def size(self) -> int:
        """The ``size`` property: plugged bytes."""
        return self.config.plugged_size

    @property
    def requested_size(self) -> int:
        return self.config.requested_size

    def set_requested_size(self, value: int) -> None:
        """virtio_mem_set_requested_size on a realized device (qom-set requested-size)."""
        if value < 0:  # the QOM layer refuses it first, with QEMU's visitor text
            raise ValueError("Invalid parameter type for 'requested-size', expected: size")
        if value % self.block_size:
            raise ValueError(f"'requested-size' has to be multiples of 'block-size' "
                             f"(0x{self.block_size:x})")
        if value > self.config.region_size:
            raise ValueError(f"'requested-size' cannot exceed the memory backend size"
                             f"(0x{self.config.region_size:x})")
        if value != self.config.requested_size:
            self._resize_usable_region(value, can_shrink=False)
            self.config.requested_size = value
        if self.config_changed is not None:  # notified even when unchanged
            self.config_changed()

    def device_info(self, memdev: str | None = None) -> dict:
        """virtio_mem_fill_device_info, as query-memory-devices returns it (no ``id`` for a device
        without one)."""
        data = {"memaddr": self.config.addr, "node": self.config.node_id,
                "requested-size": self.config.requested_size, "size": self.config.plugged_size,
                "max-size": self.config.region_size, "block-size": self.block_size,
                "memdev": memdev or f"/objects/{self.memdev}"}
        if self.id is not None:
            data["id"] = self.id
        return {"type": "virtio-mem", "data": data}

    # --- requests -----------------------------------------------------------------------------
    def _resize_usable_region(self, requested: int, *, can_shrink: bool) -> None:
        new = min(self.config.region_size, requested + VIRTIO_MEM_USABLE_EXTENT)
        new = -(-new // self.block_size) * self.block_size
        if not requested:
            new = 0
        if new < self.config.usable_region_size and not can_shrink:
            return
        self.config.usable_region_size = new

    def _valid_range(self, gpa: int, size: int) -> bool:
        c = self.config
        if gpa % self.block_size or size <= 0:
            return False
        return c.addr <= gpa and gpa + size <= c.addr + c.usable_region_size

    def _bits(self, gpa: int, size: int) -> slice:
        first = (gpa - self.config.addr) // self.block_size
        return slice(first, first + size // self.block_size)

    def request(self, kind: Request, addr: int = 0, nb_blocks: int = 0) -> tuple[Response, int]:
        """Handle one request from the driver; returns (response, STATE result or 0)."""
        self.requests[kind] += 1
        if kind == Request.UNPLUG_ALL:
            resp = self._unplug_all()
            self.responses[resp] += 1
            return resp, 0
        if not 0 <= nb_blocks <= NB_BLOCKS_MAX:
            raise ValueError(f"nb_blocks is a u16, got {nb_blocks}")
        size = nb_blocks * self.block_size
        if not self._valid_range(addr, size):
            self.responses[Response.ERROR] += 1
            return Response.ERROR, 0
        bits = self.bitmap[self._bits(addr, size)]
        if kind == Request.STATE:
            state = (BlockState.PLUGGED if bits.all() else
                     BlockState.UNPLUGGED if not bits.any() else BlockState.MIXED)
            self.responses[Response.ACK] += 1
            return Response.ACK, int(state)
        plug = kind == Request.PLUG
        resp = self._state_change(addr, size, bits, plug)
        self.responses[resp] += 1
        return resp, 0

    def _state_change(self, addr: int, size: int, bits: np.ndarray, plug: bool) -> Response:
        if plug and self.config.plugged_size + size > self.config.requested_size:
            return Response.NACK
        if (plug and bits.any()) or (not plug and not bits.all()):
            return Response.ERROR
        if self._busy():
            return Response.BUSY
        if not plug:
            self._discard(addr - self.config.addr, size)
        self.bitmap[self._bits(addr, size)] = plug
        self.config.plugged_size += size if plug else -size
        self._size_changed()
        return Response.ACK

    def _unplug_all(self) -> Response:
        if self.config.plugged_size:
            if self._busy():
                return Response.BUSY
            self._discard(0, self.config.region_size)
            self.bitmap[:] = False
            self.config.plugged_size = 0
            self._size_changed()
        self._resize_usable_region(self.config.requested_size, can_shrink=True)
        return Response.ACK

    def system_reset(self) -> None:
        """virtio_mem_system_reset: everything unplugged on reboot."""
        self._unplug_all()

    def _size_changed(self) -> None:
        self._emit("MEMORY_DEVICE_SIZE_CHANGE",
                   {"id": self.id, "size": self.config.plugged_size, "qom-path": self.qom_path})

    def plugged_pages(self) -> int:
        return self.config.plugged_size >> PAGE_SHIFT


def _block_size_fixed(device: VirtioMemDevice, value: int) -> None:
    """virtio_mem_set_block_size on a realized device."""
    raise ValueError("'block-size' cannot be changed")


# QOM of virtio-mem-pci (the proxy aliases the virtio-mem device's properties)
QOM_TYPE = "virtio-mem-pci"
QOM_VIRTIO_TYPE = "virtio-mem"
QOM_PROPERTIES = (
    QomProperty("requested-size", "size", lambda d: d.requested_size, VirtioMemDevice.set_requested_size),
    QomProperty("size", "size", lambda d: d.size),
    QomProperty("block-size", "size", lambda d: d.block_size, _block_size_fixed),
    QomProperty("node", "uint32", lambda d: d.config.node_id, static=True),
    QomProperty("memaddr", "uint64", lambda d: d.config.addr, static=True),
    QomProperty("memdev", "link<memory-backend>", lambda d: f"/objects/{d.memdev}", static=True),
)


assert GiB  # units used in docstrings
