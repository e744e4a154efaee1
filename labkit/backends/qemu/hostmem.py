"""The host's view of a live VM: how much of the guest's RAM QEMU really holds.

The model's ``host_rss`` counts the guest pages the host backs. On a real host the closest figure is
the resident size of QEMU's guest-RAM mappings (one ``memory-backend-ram`` per NUMA node: private
anonymous ``rw-p`` mappings of exactly the node's size, or a little more for QEMU's alignment), read
from ``/proc/<pid>/smaps``. The whole process (``VmRSS``, with its anonymous and file parts from
``/proc/<pid>/status``) also carries QEMU's own code, heap and, under TCG, the translation cache:
reported separately as ``qemu_rss``, ``qemu_rss_anon``, ``qemu_rss_file``.

>>> smaps = '''7f0000000000-7f0040200000 rw-p 00000000 00:00 0
... Size:            1050624 kB
... Rss:              204800 kB
... Swap:                  0 kB
... 7f1000000000-7f1000001000 r-xp 00000000 08:01 42    /usr/bin/qemu
... Size:                  4 kB
... Rss:                   4 kB
... '''
>>> guest_ram_usage(smaps, [1 << 30])
{'rss': 209715200, 'swap': 0, 'mappings': 1, 'hugetlb': 0}
"""

from __future__ import annotations

import re

from labkit.units import KiB, MiB

ALIGNMENT_SLACK = 4 * MiB  # QEMU maps a RAM block with its alignment and a guard page
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$")


def guest_ram_usage(smaps: str, node_sizes: list[int]) -> dict[str, int]:
    """Sum Rss and Swap (bytes) over the mappings that hold guest RAM: private anonymous ``rw-p``
    mappings, memfd mappings (``/memfd:...``: a ``memory-backend-memfd``) and hugetlbfs mappings
    (``KernelPageSize`` above 4 KiB), whose size is within :data:`ALIGNMENT_SLACK` above one of
    ``node_sizes`` (each node claims one mapping, largest first). Huge pages are not in ``Rss``:
    their ``Shared_Hugetlb`` and ``Private_Hugetlb`` are added (Documentation/filesystems/proc.rst).

    >>> text = '''7f0000000000-7f0040000000 rw-s 00000000 00:0f 9    /memfd:memory-backend-memfd (deleted)
    ... Size:            1048576 kB
    ... KernelPageSize:     2048 kB
    ... Rss:                   0 kB
    ... Shared_Hugetlb:    16384 kB
    ... Private_Hugetlb:       0 kB
    ... '''
    >>> guest_ram_usage(text, [1 << 30])
    {'rss': 16777216, 'swap': 0, 'mappings': 1, 'hugetlb': 16777216}
    """
    mappings = []  # [size, rss, swap, hugetlb, kernel page size, guest-RAM-like]
    current = None
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            start, end, perms, inode, path = header.groups()
            anon = inode == "0" and (path == "" or path.startswith("[anon"))
            current = [int(end, 16) - int(start, 16), 0, 0, 0, 4 * KiB,
                       (perms == "rw-p" and anon) or (perms[:2] == "rw" and path.startswith("/memfd:"))]
            mappings.append(current)
        elif current is not None:
            key, _, value = line.partition(":")
            if key == "Rss":
                current[1] = int(value.split()[0]) * KiB
            elif key == "Swap":
                current[2] = int(value.split()[0]) * KiB
            elif key in ("Shared_Hugetlb", "Private_Hugetlb"):
                current[3] += int(value.split()[0]) * KiB
            elif key == "KernelPageSize":
                current[4] = int(value.split()[0]) * KiB
    rss = swap = found = hugetlb = 0
    pool = sorted((m for m in mappings if m[5] or m[4] > 4 * KiB), key=lambda m: -m[0])
    for size in sorted(node_sizes, reverse=True):
        match = next((m for m in pool if size <= m[0] <= size + ALIGNMENT_SLACK), None)
        if match is not None:
            pool.remove(match)
            rss, swap, found = rss + match[1] + match[3], swap + match[2], found + 1
            hugetlb += match[3]
    return {"rss": rss, "swap": swap, "mappings": found, "hugetlb": hugetlb}


def process_status(status: str) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem``, ``VmSwap`` from /proc/<pid>/status, in bytes."""
    out = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSwap"):
            out[key] = int(value.split()[0]) * KiB
    return out


def read_host_memory(pid: int, node_sizes: list[int]) -> dict[str, int]:
    """Guest-RAM RSS and swap, and the whole QEMU process's RSS, in bytes."""
    with open(f"/proc/{pid}/smaps") as f:
        ram = guest_ram_usage(f.read(), node_sizes)
    with open(f"/proc/{pid}/status") as f:
        status = process_status(f.read())
    return {"guest_ram_rss": ram["rss"], "guest_ram_swap": ram["swap"],
            "guest_ram_mappings": ram["mappings"], "guest_ram_hugetlb": ram["hugetlb"],
            "qemu_rss": status.get("VmRSS", 0),
            "qemu_rss_anon": status.get("RssAnon", 0), "qemu_rss_file": status.get("RssFile", 0),
            "qemu_swap": status.get("VmSwap", 0)}


def file_mapping_usage(smaps: str, path: str) -> dict[str, int]:
    """Rss, dirty and anonymous (copied-on-write) bytes of the mappings of file ``path`` in a
    ``/proc/<pid>/smaps`` text (QEMU maps a ``memory-backend-file`` once: a virtio-pmem region).

    Dirty is ``Shared_Dirty + Private_Dirty`` (smaps calls a page private when one process maps it,
    whatever MAP_SHARED says): the page or its PTE is dirty, i.e. written since the file's last
    writeback, which cleans both (``folio_mkclean``). ``anonymous`` counts MAP_PRIVATE copies
    (``share=off``): those are dirty too, but never written to the file.

    >>> text = '''7f00-7f10 rw-s 00000000 fe:00 12    /tmp/p.img
    ... Rss:                  64 kB
    ... Shared_Dirty:          0 kB
    ... Private_Dirty:        16 kB
    ... Anonymous:             0 kB
    ... 7f20-7f30 rw-p 00000000 00:00 0
    ... Rss:                 100 kB
    ... '''
    >>> file_mapping_usage(text, "/tmp/p.img")
    {'rss': 65536, 'dirty': 16384, 'anonymous': 0, 'mappings': 1}
    """
    out = {"rss": 0, "dirty": 0, "anonymous": 0, "mappings": 0}
    inside = False
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(5).removesuffix(" (deleted)")
            inside = name == path
            out["mappings"] += inside
        elif inside:
            key, _, value = line.partition(":")
            field = {"Rss": "rss", "Shared_Dirty": "dirty", "Private_Dirty": "dirty",
                     "Anonymous": "anonymous"}.get(key)
            if field:
                out[field] += int(value.split()[0]) * KiB
    return out


def resident_pages(path: str, first: int = 0, count: int | None = None) -> int:
    """How many of the file's pages ``[first, first + count)`` are in the host page cache
    (``mincore`` of a read-only shared mapping: it reports the page cache, whoever filled it)."""
    import ctypes
    import mmap
    import os

    import numpy as np

    pages = -(-os.path.getsize(path) // mmap.PAGESIZE)
    count = pages - first if count is None else min(count, pages - first)
    if count <= 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    length = count * mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first * mmap.PAGESIZE)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = np.zeros(count, np.uint8)
            if libc.mincore(address, length, vector.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return int(np.count_nonzero(vector & 1))
        finally:
            libc.munmap(address, length)
    finally:
        os.close(fd)
