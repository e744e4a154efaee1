"""Build (and cache) the live guest: a kernel and a busybox initramfs with the virtio modules.

``build_guest_image()`` finds a kernel (:mod:`labkit.backends.qemu.kernel`), then writes an
uncompressed newc initramfs (uncompressed: under TCG the guest would spend longer inflating it than
the host spends reading it) holding:

* ``/bin/busybox`` (it must be a static binary: Debian's ``busybox-static``) and a symlink per applet;
* ``/init`` (:data:`~labkit.backends.qemu.guestfiles.INIT_SCRIPT`), ``/dev/console``, ``/dev/null``;
* the loadable modules, decompressed, as ``/lib/modules/<name>.ko``, and their load order in
  ``/etc/labkit/modules``;
* ``/bin/memhold``, the anonymous-memory helper, when ``gcc -static`` works on this host; else the
  guest uses busybox ``dd`` (``/etc/labkit/helper`` says which: ``memhold`` or ``dd``).

Beside it go the kernel as found (``vmlinuz``) and, when that kernel has a PVH entry point, its
uncompressed ``vmlinux`` (:mod:`labkit.backends.qemu.pvh`), which QEMU boots ~0.5 s sooner under TCG
(:attr:`GuestImage.boot_kernel`; ``qemu={"pvh": False}`` boots the bzImage).

The result is cached in ``$XDG_CACHE_HOME/labkit/guest/<kernel version>/`` (``~/.cache`` when unset)
and rebuilt when anything that went into it changed (the build key in ``image.json``).

>>> image = build_guest_image()  # doctest: +SKIP
>>> image.kernel.name, image.helper  # doctest: +SKIP
('vmlinuz', 'memhold')
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit.backends.qemu import guestfiles
from labkit.backends.qemu.cpio import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, Entry, write_newc
from labkit.backends.qemu.kernel import (
    REQUIRED_MODULES,
    KernelNotFound,
    KernelSource,
    find_kernel,
    plan_modules,
    read_module,
    safe_name,
    under,
)
from labkit.backends.qemu.pvh import extract_pvh_vmlinux

log = logging.getLogger("labkit.qemu")
IMAGE_FORMAT = 2  # bump when the layout changes in a way the build key can't see
DIRECTORIES = ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "mnt", "etc", "etc/labkit", "lib",
               "lib/modules", "root")


@dataclass(frozen=True)
class GuestImage:
    """Paths and facts of a built guest image (what ``image.json`` holds)."""

    kernel: Path
    initramfs: Path
    version: str
    origin: str
    modules: tuple[str, ...]
    builtin: tuple[str, ...]
    missing: tuple[str, ...]
    helper: str  # "memhold" (gcc -static) or "dd" (busybox fallback)
    directory: Path
    pvh: bool = False  # directory/vmlinux holds the uncompressed kernel, bootable at its PVH entry

    @property
    def boot_kernel(self) -> Path:
        """What QEMU's ``-kernel`` gets: the PVH vmlinux when there is one, else the bzImage."""
        return self.directory / "vmlinux" if self.pvh else self.kernel

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/labkit`` or ``~/.cache/labkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labkit"


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i * phentsize: i * phentsize + 4], "little") != 3
               for i in range(phnum))


def find_busybox() -> Path:
    for candidate in (os.environ.get("LABKIT_BUSYBOX"), shutil.which("busybox"), "/bin/busybox",
                      "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    raise FileNotFoundError("no static busybox found: install Debian's 'busybox-static' "
                            "(apt-get install busybox-static) or set LABKIT_BUSYBOX")


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30)
    return sorted(a for a in out.stdout.split() if a and a != "busybox")


def compile_memhold(workdir: Path) -> Path | None:
    """``gcc -static`` the anon-memory helper; ``None`` (and a log line) if that can't be done."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        log.info("no gcc: anon memory in the guest uses busybox dd")
        return None
    source, binary = workdir / "memhold.c", workdir / "memhold"
    source.write_text(guestfiles.MEMHOLD_C)
    result = subprocess.run([gcc, "-static", "-O2", "-s", "-o", str(binary), str(source)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        log.info("gcc -static failed (%s): anon memory uses busybox dd", result.stderr.strip()[-300:])
        return None
    return binary


def initramfs_entries(busybox: Path, applets: list[str], modules: list[tuple[str, bytes]],
                      helper: Path | None) -> list[Entry]:
    """Everything in the initramfs, in archive order (directories before their files)."""
    entries = [Entry(d, S_IFDIR | 0o755) for d in DIRECTORIES]
    entries += [Entry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
                Entry("dev/null", S_IFCHR | 0o666, rdev=(1, 3)),
                Entry("init", S_IFREG | 0o755, guestfiles.INIT_SCRIPT.encode()),
                Entry("bin/busybox", S_IFREG | 0o755, busybox.read_bytes())]
    entries += [Entry(f"bin/{a}", S_IFLNK | 0o777, b"busybox") for a in applets]
    entries += [Entry("bin/sh", S_IFLNK | 0o777, b"busybox")] if "sh" not in applets else []
    entries += [Entry(f"lib/modules/{name}.ko", S_IFREG | 0o644, data) for name, data in modules]
    lines = [f"{name} lazy" if name in guestfiles.LAZY_MODULES else name for name, _ in modules]
    entries.append(Entry("etc/labkit/modules", S_IFREG | 0o644, "".join(f"{x}\n" for x in lines).encode()))
    entries.append(Entry("etc/labkit/helper", S_IFREG | 0o644, b"memhold" if helper else b"dd"))
    if helper is not None:
        entries.append(Entry("bin/memhold", S_IFREG | 0o755, helper.read_bytes()))
    return entries


def _build_key(source: KernelSource, busybox: Path, module_names: list[str], want_helper: bool) -> str:
    h = hashlib.sha256()
    st = source.vmlinuz.stat()
    bb = busybox.stat()
    for part in (IMAGE_FORMAT, source.version, str(source.vmlinuz), st.st_size, int(st.st_mtime),
                 str(busybox), bb.st_size, int(bb.st_mtime), module_names, want_helper,
                 guestfiles.INIT_SCRIPT, guestfiles.MEMHOLD_C):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _load(directory: Path, key: str) -> GuestImage | None:
    try:
        meta = json.loads((directory / "image.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("build_key") != key or not (directory / "initramfs.cpio").exists():
        return None
    return GuestImage(directory / "vmlinuz", directory / "initramfs.cpio", meta["version"],
                      meta["origin"], tuple(meta["modules"]), tuple(meta["builtin"]),
                      tuple(meta["missing"]), meta["helper"], directory, bool(meta.get("pvh")))


def build_guest_image(kernel: str | Path | None = None, *, cache_dir: str | Path | None = None,
                      rebuild: bool = False, helper: str = "auto", download: bool = True) -> GuestImage:
    """Find a kernel and build (or reuse) the guest image; return its paths.

    ``kernel``: a vmlinuz path (default: ``LABKIT_KERNEL``, ``/boot``, then the distribution's
    package). ``helper``: ``"auto"`` (memhold if gcc works), ``"memhold"`` (fail without gcc) or
    ``"dd"`` (the busybox fallback); ``"auto"`` follows ``LABKIT_GUEST_HELPER`` when it is set (e.g.
    ``dd`` to run the live tests as a host without gcc would). ``rebuild=True`` ignores the cache.
    """
    source_of_helper = "helper"
    if helper == "auto" and os.environ.get("LABKIT_GUEST_HELPER"):
        helper, source_of_helper = os.environ["LABKIT_GUEST_HELPER"], "LABKIT_GUEST_HELPER"
    if helper not in ("auto", "memhold", "dd"):
        raise ValueError(f"{source_of_helper} {helper!r} is not one of ['auto', 'memhold', 'dd']")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    source = find_kernel(kernel, root, download=download, refresh=rebuild)
    plan = plan_modules(source.modules_dir)
    absent = [m for m in REQUIRED_MODULES if m in plan.missing]
    if absent:
        raise KernelNotFound(f"kernel {source.version} ({source.origin}) lacks {absent} (neither built "
                             f"in nor found under {source.modules_dir}); the balloon needs them")
    busybox = find_busybox()
    names = [name for name, _ in plan.load]
    key = _build_key(source, busybox, names, helper != "dd")
    # the version is a validated single name (kernel.safe_name); checked again here because this
    # directory is removed and replaced below
    directory = under(root / "guest", root / "guest" / safe_name(source.version, "kernel version"))
    if not rebuild and (image := _load(directory, key)) is not None:
        return image
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(directory.parent / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    with os.fdopen(lock_fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two builds at once: the second reuses the first's result
        if not rebuild and (image := _load(directory, key)) is not None:
            return image
        with tempfile.TemporaryDirectory(prefix=".build-", dir=directory.parent) as tmp:
            work = Path(tmp)
            binary = compile_memhold(work) if helper != "dd" else None
            if helper == "memhold" and binary is None:
                raise RuntimeError("helper='memhold' needs a working 'gcc -static' (apt-get install gcc "
                                   "libc6-dev)")
            modules = [(name, read_module(path)) for name, path in plan.load]
            entries = initramfs_entries(busybox, busybox_applets(busybox), modules, binary)
            out = work / "out"
            out.mkdir()
            with open(out / "initramfs.cpio", "wb") as f:
                write_newc(entries, f)
            shutil.copyfile(source.vmlinuz, out / "vmlinuz")
            vmlinux = extract_pvh_vmlinux(source.vmlinuz)
            if vmlinux is not None:
                (out / "vmlinux").write_bytes(vmlinux)
            image = GuestImage(directory / "vmlinuz", directory / "initramfs.cpio", source.version,
                               source.origin, tuple(names), tuple(plan.builtin), tuple(plan.missing),
                               "memhold" if binary else "dd", directory, vmlinux is not None)
            (out / "image.json").write_text(json.dumps(image.to_json() | {"build_key": key}, indent=1))
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(out, directory)
    log.info("built guest image %s: modules %s, built in %s, missing %s, helper %s", directory,
             names, plan.builtin, plan.missing, image.helper)
    return image
