"""Boot the guest kernel at its PVH entry point: the uncompressed ``vmlinux``, no decompressor.

A bzImage starts in real mode, then its decompressor inflates the kernel (and, with KASLR, applies
its relocations) before Linux proper runs: ~0.5 s of a ~3 s boot under TCG here, measured as the
time until "Linux version" on the serial port (0.59-0.85 s for Debian's LZ4 bzImage, 0.12-0.30 s
for its vmlinux). Kernels built with ``CONFIG_PVH`` (Debian's are) carry an ELF note
``XEN_ELFNOTE_PHYS32_ENTRY``; QEMU loads such an ELF given as ``-kernel`` and enters it in 32-bit
protected mode through its ``pvh.bin`` option ROM (hw/i386/x86.c ``x86_load_linux``,
``pvh_load_elfboot``), with the same e820 map, ACPI tables, command line and initrd.

:func:`extract_pvh_vmlinux` takes the payload out of a bzImage (setup header fields
``payload_offset`` and ``payload_length``, Documentation/arch/x86/boot.rst) and inflates it: gzip
and xz with the standard library, LZ4 (Debian's cloud kernel: the legacy LZ4 frame, blocks of
8 MiB) with ``liblz4.so.1`` through ctypes (apt depends on it, so every Debian has it), zstd with
the ``zstandard`` module when it is installed. It returns ``None`` when anything is missing: the
guest then boots the bzImage as before.

>>> has_pvh_entry(b"\\x04\\x00\\x00\\x00\\x08\\x00\\x00\\x00\\x12\\x00\\x00\\x00Xen\\x00" + bytes(8))
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import lzma
import re
import zlib
from pathlib import Path

XEN_ELFNOTE_PHYS32_ENTRY = 18  # include/xen/interface/elfnote.h
LZ4_LEGACY_MAGIC = 0x184C2102  # lib/decompress_unlz4.c ARCHIVE_MAGICNUMBER
LZ4_LEGACY_BLOCK = 8 << 20  # lz4 -l: 8 MiB blocks
_PVH_NOTE = re.compile(rb"\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00")


def has_pvh_entry(elf: bytes) -> bool:
    """True if ``elf`` holds a Xen ``PHYS32_ENTRY`` note (namesz 4, type 18, name "Xen")."""
    return bool(_PVH_NOTE.search(elf))


def bzimage_payload(image: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage (boot protocol 2.08+), or None."""
    if image[0x202:0x206] != b"HdrS" or int.from_bytes(image[0x206:0x208], "little") < 0x208:
        return None
    setup = ((image[0x1F1] or 4) + 1) * 512
    offset = int.from_bytes(image[0x248:0x24C], "little")
    length = int.from_bytes(image[0x24C:0x250], "little")
    return image[setup + offset: setup + offset + length]


def _unlz4_legacy(payload: bytes) -> bytes | None:
    name = ctypes.util.find_library("lz4") or "liblz4.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.LZ4_decompress_safe.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int)
    out, pos, block = bytearray(), 4, ctypes.create_string_buffer(LZ4_LEGACY_BLOCK)
    while pos + 4 <= len(payload):
        size = int.from_bytes(payload[pos:pos + 4], "little")
        if size == LZ4_LEGACY_MAGIC:  # another frame follows
            pos += 4
            continue
        if pos + 4 + size > len(payload):  # the kernel build appends the inflated size: the end
            break
        n = lib.LZ4_decompress_safe(payload[pos + 4:pos + 4 + size], block, size, LZ4_LEGACY_BLOCK)
        if n < 0:
            return None
        out += block.raw[:n]
        pos += 4 + size
    return bytes(out)


def inflate(payload: bytes) -> bytes | None:
    """The kernel ELF from a bzImage payload, by its magic; None for what can't be inflated here."""
    try:
        if payload[:2] == b"\x1f\x8b":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        if int.from_bytes(payload[:4], "little") == LZ4_LEGACY_MAGIC:
            return _unlz4_legacy(payload)
        if payload[:4] == b"\x28\xb5\x2f\xfd":
            import zstandard  # type: ignore[import-not-found]

            return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    except (ImportError, OSError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile):
        return None
    return None


def extract_pvh_vmlinux(vmlinuz: Path) -> bytes | None:
    """The uncompressed kernel of ``vmlinuz`` if it has a PVH entry point, else None."""
    payload = bzimage_payload(Path(vmlinuz).read_bytes())
    if not payload:
        return None
    elf = inflate(payload)
    return elf if elf and elf[:4] == b"\x7fELF" and has_pvh_entry(elf) else None
