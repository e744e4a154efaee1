"""Find a Linux kernel for the live guest, and its virtio modules in load order.

Where the kernel comes from, first match wins:

1. an explicit path, or the ``LABKIT_KERNEL`` environment variable (a ``vmlinuz``; its modules from
   ``LABKIT_KERNEL_MODULES``, else ``<root>/lib/modules/<version>`` beside a ``<root>/boot/``, else
   ``/lib/modules/<version>``);
2. a readable ``/boot/vmlinuz-*`` whose ``/lib/modules/<version>`` exists (newest first);
3. the distribution's kernel package, fetched with ``apt-get download`` and unpacked with
   ``dpkg -x`` into the cache (no root needed). The metapackage (``LABKIT_KERNEL_PACKAGE``, else the
   first of :data:`KERNEL_METAPACKAGES` apt knows) names the versioned image package; on Ubuntu its
   modules come in ``linux-modules-<version>``, which is fetched too.

Modules may be built in (listed in ``modules.builtin``) or loadable (``.ko``, ``.ko.xz``, ``.ko.gz``,
``.ko.zst``); only loadable ones go into the initramfs, decompressed, in dependency order (from
``modules.dep`` when present, else from each module's own ``depends=`` modinfo, as ``depmod`` does:
Debian's package ships no ``modules.dep``, its postinst makes one).

>>> depends_from_modinfo(b"license=GPL\\x00depends=virtio,virtio_ring\\x00name=virtio_balloon\\x00")
['virtio', 'virtio_ring']
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("labkit.qemu")

KERNEL_METAPACKAGES = ("linux-image-cloud-amd64", "linux-image-amd64", "linux-image-virtual",
                       "linux-image-generic")
# What the mechanisms need, in no particular order (dependency order is computed).
REQUIRED_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                    "virtio_pci", "virtio_balloon", "virtio_console")
OPTIONAL_MODULES = ("virtio_mem", "libnvdimm", "nd_virtio", "virtio_pmem", "nd_btt", "nd_pmem",
                    "virtio_blk")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
APT_TIMEOUT_S = 300


class KernelNotFound(RuntimeError):
    """No usable guest kernel: the message says every place that was tried and why it failed."""


# A kernel release (``uname -r``: 6.1.0-56-cloud-amd64) and a Debian package name
# (linux-image-6.1.0-56-cloud-amd64) name directories in the cache: nothing else may get there.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


def safe_name(text: str, what: str) -> str:
    """``text`` if it can name one directory (letters, digits and ``. _ + ~ -``, not starting with
    a dot or a dash, at most 128 characters: no ``/``, no ``..``); else :class:`KernelNotFound`.

    >>> safe_name("6.1.0-56-cloud-amd64", "kernel version")
    '6.1.0-56-cloud-amd64'
    >>> safe_name("../../../victim", "kernel version")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    labkit.backends.qemu.kernel.KernelNotFound: kernel version '../../../victim' cannot name a ...
    """
    if not isinstance(text, str) or not SAFE_NAME.fullmatch(text):
        raise KernelNotFound(f"{what} {text!r} cannot name a directory: accepted are letters, "
                             f"digits and . _ + ~ - (not first), up to 128 characters")
    return text


def under(root: Path, path: Path) -> Path:
    """``path`` if it lies strictly inside ``root`` once ``.`` and ``..`` are resolved (lexically:
    the cache's own symlinks, if the user made any, are the user's choice); else ValueError."""
    base, full = os.path.normpath(os.path.abspath(root)), os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([base, full]) != base or full == base:
        raise ValueError(f"{path} is not inside {root}: refusing to write there")
    return path


@dataclass(frozen=True)
class KernelSource:
    """A kernel image and the directory of its modules (``None``: everything must be built in)."""

    vmlinuz: Path
    modules_dir: Path | None
    version: str
    origin: str


@dataclass
class ModulePlan:
    """The modules to load, in order, and what was built in or missing."""

    load: list[tuple[str, Path]] = field(default_factory=list)
    builtin: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def norm(name: str) -> str:
    """Module names treat '-' and '_' alike (``nd_pmem`` is built from ``nd_pmem.ko``)."""
    return name.replace("-", "_")


def module_name(path: str | Path) -> str:
    base = Path(path).name
    for suffix in MODULE_SUFFIXES[::-1]:
        if base.endswith(suffix):
            return norm(base[: -len(suffix)])
    return norm(base)


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressing ``.xz`` / ``.gz`` (stdlib) or ``.zst`` (``zstandard``
    or the ``zstd`` tool)."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]

            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        except ImportError:
            if shutil.which("zstd") is None:
                raise RuntimeError(f"{path} is zstd-compressed: install the 'zstd' tool or "
                                   "'pip install zstandard'") from None
            return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return raw


def depends_from_modinfo(elf: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` section (NUL-separated key=value strings)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", elf)
    if not match or not match.group(1):
        return []
    return [norm(d) for d in match.group(1).decode().split(",") if d]


def kernel_version(vmlinuz: Path) -> str | None:
    """The version string in a bzImage's setup header (``kernel_version`` at 0x20E), e.g.
    ``6.1.0-56-cloud-amd64``; ``None`` if the file is not a bzImage."""
    with open(vmlinuz, "rb") as f:
        head = f.read(0x4000)
    if head[0x202:0x206] != b"HdrS":
        return None
    offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[offset:offset + 256].split(b"\0")[0].decode(errors="replace")
    return text.split()[0] if text.split() else None


def plan_modules(modules_dir: Path | None, wanted: tuple[str, ...] = REQUIRED_MODULES + OPTIONAL_MODULES
                 ) -> ModulePlan:
    """Which of ``wanted`` (and their dependencies) to load, in dependency order."""
    plan = ModulePlan()
    if modules_dir is None:
        plan.missing = [m for m in wanted]
        return plan
    builtin = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.exists():
        builtin = {module_name(line.strip()) for line in builtin_file.read_text().splitlines() if line}
    files = {module_name(p): p for p in modules_dir.rglob("*.ko*") if p.name.endswith(MODULE_SUFFIXES)}
    deps: dict[str, list[str]] = {}
    dep_file = modules_dir / "modules.dep"
    if dep_file.exists():
        for line in dep_file.read_text().splitlines():
            if ":" in line:
                target, _, rest = line.partition(":")
                deps[module_name(target)] = [module_name(d) for d in rest.split()]

    def dependencies(name: str) -> list[str]:
        if name not in deps:
            deps[name] = depends_from_modinfo(read_module(files[name]))
        return deps[name]

    ordered: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> bool:
        if name in builtin:
            if name not in plan.builtin:
                plan.builtin.append(name)
            return True
        if name not in files:
            return False
        if name in seen:
            return True
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        ok = all(visit(d, chain + (name,)) for d in dependencies(name))
        if ok:
            seen.add(name)
            ordered.append(name)
        return ok

    for name in wanted:
        if not visit(norm(name), ()):
            plan.missing.append(norm(name))
    plan.load = [(name, files[name]) for name in ordered]
    return plan


def _modules_for(vmlinuz: Path, version: str) -> Path | None:
    env = os.environ.get("LABKIT_KERNEL_MODULES")
    candidates = [Path(env)] if env else []
    if vmlinuz.parent.name == "boot":
        candidates.append(vmlinuz.parent.parent / "lib" / "modules" / version)
    candidates.append(Path("/lib/modules") / version)
    return next((c for c in candidates if c.is_dir()), None)


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def _from_path(vmlinuz: Path, origin: str) -> KernelSource:
    if not _readable(vmlinuz):
        raise KernelNotFound(f"{origin}: {vmlinuz} is not a readable file")
    version = kernel_version(vmlinuz) or vmlinuz.name.removeprefix("vmlinuz-")
    safe_name(version, f"{origin}: {vmlinuz}: kernel version")  # it names cache directories
    return KernelSource(vmlinuz, _modules_for(vmlinuz, version), version, origin)


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                          env={**os.environ, "LC_ALL": "C"})


def _depends(package: str) -> list[str]:
    result = _apt(["apt-cache", "depends", package])
    if result.returncode != 0:
        return []
    return [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
            if line.strip().startswith("Depends:")]


def download_kernel(cache_root: Path, refresh: bool = False) -> KernelSource:
    """Fetch the distribution's kernel package with ``apt-get download`` and unpack it with
    ``dpkg -x`` under ``cache_root/kernels/``. A kernel unpacked there before is reused without asking
    apt (``refresh=True`` asks apt again, and fetches a newer package if there is one)."""
    unpacked = sorted((cache_root / "kernels").glob("*/.unpacked"), key=lambda p: p.stat().st_mtime)
    if unpacked and not refresh and not os.environ.get("LABKIT_KERNEL_PACKAGE"):
        vmlinuz = sorted((unpacked[-1].parent / "boot").glob("vmlinuz-*"))
        if vmlinuz:
            return _from_path(vmlinuz[-1], f"apt package {unpacked[-1].parent.name} (cached)")
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise KernelNotFound(f"apt download: '{tool}' is not installed (not a Debian/Ubuntu host)")
    metas = [os.environ["LABKIT_KERNEL_PACKAGE"]] if os.environ.get("LABKIT_KERNEL_PACKAGE") else list(
        KERNEL_METAPACKAGES)
    image = None
    for meta in metas:
        image = next((d for d in _depends(meta) if re.match(r"linux-image-(unsigned-)?\d", d)), None)
        if image is None and re.match(r"linux-image-(unsigned-)?\d", meta):
            image = meta
        if image:
            break
    if image is None:
        raise KernelNotFound(f"apt download: none of {metas} is known to apt (run 'apt-get update' "
                             "as root, or set LABKIT_KERNEL to a vmlinuz)")
    root = under(cache_root / "kernels", cache_root / "kernels" / safe_name(image, "apt package"))
    if not (root / ".unpacked").exists():
        suffix = re.sub(r"^linux-image-(unsigned-)?", "", image)
        packages = [image] + [d for d in _depends(image) if d == f"linux-modules-{suffix}"]
        with tempfile.TemporaryDirectory(prefix="labkit-kernel-") as tmp:
            for package in packages:
                result = _apt(["apt-get", "download", package], cwd=Path(tmp))
                if result.returncode != 0:
                    raise KernelNotFound(f"apt-get download {package} failed: "
                                         f"{result.stderr.strip()[-500:]}")
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            for deb in sorted(Path(tmp).glob("*.deb")):
                result = _apt(["dpkg", "-x", str(deb), str(root)])
                if result.returncode != 0:
                    raise KernelNotFound(f"dpkg -x {deb.name} failed: {result.stderr.strip()[-500:]}")
        (root / ".unpacked").write_text(" ".join(packages) + "\n")
        log.info("unpacked %s into %s", " ".join(packages), root)
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise KernelNotFound(f"apt download: {image} has no /boot/vmlinuz-*")
    return _from_path(vmlinuz[-1], f"apt package {image}")


def find_kernel(kernel: str | Path | None = None, cache_root: Path | None = None,
                download: bool = True, refresh: bool = False) -> KernelSource:
    """Find a guest kernel (see the module docstring for the order). Raises :class:`KernelNotFound`
    listing what was tried."""
    if kernel is not None:
        return _from_path(Path(kernel), "kernel argument")
    if os.environ.get("LABKIT_KERNEL"):
        return _from_path(Path(os.environ["LABKIT_KERNEL"]), "LABKIT_KERNEL")
    tried = []
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        if not _readable(vmlinuz):
            tried.append(f"{vmlinuz}: not readable")
            continue
        source = _from_path(vmlinuz, "/boot")
        if source.modules_dir is None:
            tried.append(f"{vmlinuz}: no /lib/modules/{source.version}")
            continue
        return source
    if not tried:
        tried.append("/boot: no vmlinuz-*")
    if download and cache_root is not None:
        try:
            return download_kernel(cache_root, refresh)
        except (KernelNotFound, OSError, subprocess.SubprocessError) as e:
            tried.append(str(e))
    raise KernelNotFound("no guest kernel found; tried: " + "; ".join(tried) +
                         ". Set LABKIT_KERNEL to a vmlinuz (and LABKIT_KERNEL_MODULES to its modules)")
