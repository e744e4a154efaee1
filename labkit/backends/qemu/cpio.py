"""The initramfs archive format: "newc" cpio (Documentation/driver-api/early-userspace/buffer-format.rst).

Written here rather than with the ``cpio`` tool so that device nodes (``/dev/console``) and root
ownership go into the archive without root, and so the archive is byte-for-byte reproducible.

>>> import io
>>> buf = io.BytesIO()
>>> write_newc([Entry("init", 0o100755, b"#!/bin/sh\\n"), Entry("dev", 0o040755)], buf)
>>> [(e.name, oct(e.mode), e.data) for e in read_newc(buf.getvalue())]
[('init', '0o100755', b'#!/bin/sh\\n'), ('dev', '0o40755', b'')]
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR


@dataclass(frozen=True)
class Entry:
    """One archive member: ``mode`` includes the file type bits (``0o100755`` a regular file).

    A symlink's ``data`` is its target; a device node has ``rdev`` (major, minor)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: list[Entry], out: BinaryIO) -> None:
    """Write ``entries`` then the trailer; owner root, mtime 0, inode numbers from 1."""
    for ino, entry in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        name = entry.name.lstrip("/").encode() + b"\0"
        fields = (ino if entry.name != TRAILER else 0, entry.mode, 0, 0,
                  2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        out.write(header + name + _pad(len(header) + len(name)))
        out.write(entry.data + _pad(len(entry.data)))


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (uncompressed) back into entries, without the trailer."""
    entries, pos = [], 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"not a newc cpio archive at offset {pos}: {data[pos:pos + 6]!r}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmajor, rminor, namesize = (fields[1], fields[6], fields[9], fields[10],
                                                    fields[11])
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, data[body:body + filesize], (rmajor, rminor)))
        pos = body + filesize + (-filesize % 4)
