"""The QEMU process: its command line (an argument list, never a shell), the accelerator, its life.

* :func:`qemu_command` turns the same options as the model (``memory``, ``balloon`` with QEMU's
  property names in underscores, ``numa_nodes``) into ``qemu-system-x86_64`` arguments. Guest RAM is
  one ``memory-backend-ram`` per NUMA node, so the host side can find exactly the guest's RAM among
  QEMU's mappings (:mod:`labkit.backends.qemu.hostmem`).
* :func:`kvm_unusable_reason` says why KVM can't be used (``None``: worth trying). A ``/dev/kvm``
  can open and still fail to run a guest (nested virtualization), so the backend also falls back to
  TCG when a KVM boot fails or hangs, and logs why.
* :class:`QemuProcess` starts QEMU in a private 0700 directory (sockets, stderr, scratch disk),
  with ``PR_SET_PDEATHSIG`` (via util-linux ``setpriv``) so QEMU dies with the Python process even on
  SIGKILL, and kills it by PID on :meth:`~QemuProcess.stop`. :func:`sweep_stale` removes what a
  killed Python left behind.

>>> args = qemu_command(QemuConfig(memory=512 << 20, balloon={"deflate_on_oom": True}),
...                     "/tmp/x", "vmlinuz", "initrd")
>>> args[args.index("-m") + 1]
'512M'
>>> [a for a in args if a.startswith("virtio-balloon")][0].split(",")[:3]
['virtio-balloon-pci', 'id=balloon0', 'deflate-on-oom=on']
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from labkit.backends.qemu.guestfiles import COMMAND_PORT
from labkit.units import MiB

log = logging.getLogger("labkit.qemu")

QEMU_BINARY = "qemu-system-x86_64"
QBOOT_PATHS = ("/usr/share/qemu/qboot.rom", "/usr/share/qemu/qboot.bin")
# Kernel parameters that only make a TCG boot faster, and change nothing the labs measure.
FAST_BOOT_CMDLINE = ("quiet", "panic=-1", "tsc=reliable", "no_timer_check", "i8042.noaux",
                     "i8042.nokbd", "i8042.nopnp", "cryptomgr.notests")
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_API_VERSION = 0xAE00, 0xAE01, 12
PR_SET_THP_DISABLE = 41
STATE_DIR_PREFIX = "labkit-qemu-"
_thp_lock = threading.Lock()


@dataclass(frozen=True)
class QemuConfig:
    """Everything the QEMU command line depends on (sizes in bytes)."""

    memory: int
    balloon: dict | None = field(default_factory=dict)  # None: no balloon device
    numa_nodes: int = 1
    accel: str = "tcg"  # "kvm" or "tcg"
    smp: int = 1
    cmdline: str = ""  # extra kernel parameters
    scratch_disk: bool = True  # a virtio-blk disk for page-cache workloads (kind="file")
    scratch_size: int = 0  # 0: the guest's memory size
    bios: str | None = "auto"  # "auto": qboot when installed (faster than SeaBIOS), else QEMU's default
    extra_args: tuple[str, ...] = ()
    virtio_mem: tuple[dict, ...] = ()  # validated specs (sizes in bytes), as the model's
    memhp_default_state: str = "offline"
    virtio_pmem: tuple[dict, ...] = ()  # validated specs (labkit.backends.options)
    maxmem: int | None = None  # None: boot RAM plus the memory devices
    qemu_args: tuple[str, ...] = ()  # the user's QEMU command line, passed on as given
    from_line: frozenset[str] = frozenset()  # what qemu_args gives ("memory", "balloon", ...): not added


def balloon_properties(options: dict) -> str:
    """``-device`` text of the balloon: QEMU property names are the option names with dashes."""
    from labkit.devices.balloon import PROPERTY_DEFAULTS

    opts = {**PROPERTY_DEFAULTS, **options}
    if opts["id"] is None:  # an anonymous device (a command line without id=)
        opts["id"] = "balloon0"
    parts = ["virtio-balloon-pci", f"id={opts['id']}"]
    for name in sorted(k for k in opts if k not in ("id", "iothread")):
        value = opts[name]
        parts.append(f"{name.replace('_', '-')}={'on' if value else 'off'}" if isinstance(value, bool)
                     else f"{name.replace('_', '-')}={value}")
    if opts["iothread"]:
        parts.append(f"iothread={opts['iothread']}")
    return ",".join(parts)


def memory_option(config: QemuConfig) -> str:
    """``-m``: boot RAM, and ``maxmem`` covering the virtio-mem devices' memory backends."""
    text = f"{config.memory // MiB}M"
    device_memory = sum(s["size"] for s in config.virtio_mem) + sum(s["size"] for s in config.virtio_pmem)
    total = config.maxmem if config.maxmem is not None else config.memory + device_memory
    if total > config.memory:  # a virtio-pmem region is a whole number of pages, not always of MiB
        text += f",maxmem={total // MiB}M" if total % MiB == 0 else f",maxmem={total // 1024}K"
    return text


def virtio_mem_properties(spec: dict) -> str:
    """``-device virtio-mem-pci,...`` from a model-style spec (``dynamic_memslots`` only when on:
    QEMU before 8.2 doesn't know it, and says so)."""
    parts = ["virtio-mem-pci", f"id={spec['id']}", f"memdev=mem-{spec['id']}", f"node={spec['node']}",
             f"requested-size={spec['requested_size'] // MiB}M",
             f"block-size={spec['block_size'] // 1024}K", f"prealloc={'on' if spec['prealloc'] else 'off'}",
             f"unplugged-inaccessible={spec['unplugged_inaccessible']}"]
    if spec.get("memaddr") is not None:
        parts.append(f"memaddr={spec['memaddr']}")
    if spec.get("dynamic_memslots"):
        parts.append("dynamic-memslots=on")
    return ",".join(parts)


def virtio_pmem_arguments(spec: dict) -> list[str]:
    """``-object memory-backend-file`` + ``-device virtio-pmem-pci`` for a model-style spec (the
    backend is ``mem-<id>``, as on the model). A comma in the path is doubled: QEMU's escape."""
    path = os.path.abspath(spec["path"]).replace(",", ",,")
    return ["-object", f"memory-backend-file,id=mem-{spec['id']},share={'on' if spec['share'] else 'off'},"
                       f"mem-path={path},size={spec['size']}",
            "-device", f"virtio-pmem-pci,memdev=mem-{spec['id']},id={spec['id']}"]


def node_sizes(memory: int, numa_nodes: int) -> list[int]:
    """Per-node RAM: equal shares in whole 128 MiB blocks, the rest on the last node (as the model)."""
    from labkit.backends.options import equal_node_sizes

    return list(equal_node_sizes(memory, numa_nodes))


def find_bios(choice: str | None) -> str | None:
    if choice == "auto":
        return next((p for p in QBOOT_PATHS if Path(p).exists()), None)
    return choice


def qemu_command(config: QemuConfig, state_dir: str, kernel: str, initramfs: str,
                 qemu: str = QEMU_BINARY) -> list[str]:
    """The argument list for ``config``; sockets and the scratch disk live in ``state_dir``."""
    line = config.from_line
    args = [qemu, "-name", f"labkit,process=labkit-{Path(state_dir).name}", "-machine", "q35",
            "-accel", config.accel, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"socket,id=qmp,path={state_dir}/qmp.sock,server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=cmd,path={state_dir}/serial.sock,server=on,wait=on",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,chardev=cmd,name={COMMAND_PORT}",
            "-chardev", f"file,id=ser0,path={state_dir}/console.log", "-serial", "chardev:ser0",
            "-kernel", kernel, "-initrd", initramfs,
            "-append", " ".join(["console=ttyS0", *FAST_BOOT_CMDLINE,
                                 f"memhp_default_state={config.memhp_default_state}",
                                 config.cmdline]).strip()]
    if "memory" not in line:
        args[5:5] = ["-m", memory_option(config)]
    if "smp" not in line:
        args[5:5] = ["-smp", str(config.smp)]
    bios = find_bios(config.bios)
    if bios:
        args += ["-bios", bios]
    if not config.qemu_args:  # labkit's own boot RAM: one backend per node (a command line has its own)
        sizes = node_sizes(config.memory, config.numa_nodes)
        if config.numa_nodes == 1:
            args += ["-object", f"memory-backend-ram,id=ram0,size={sizes[0] // MiB}M",
                     "-machine", "memory-backend=ram0"]
        else:
            for node, size in enumerate(sizes):
                args += ["-object", f"memory-backend-ram,id=ram{node},size={size // MiB}M",
                         "-numa", f"node,nodeid={node},memdev=ram{node}"]
    if config.balloon is not None and "balloon" not in line:
        if config.balloon.get("iothread"):
            args += ["-object", f"iothread,id={config.balloon['iothread']}"]
        args += ["-device", balloon_properties(config.balloon)]
    if "virtio_mem" not in line:
        for spec in config.virtio_mem:
            args += ["-object", f"memory-backend-ram,id=mem-{spec['id']},size={spec['size'] // MiB}M",
                     "-device", virtio_mem_properties(spec)]
    if "virtio_pmem" not in line:
        for spec in config.virtio_pmem:
            args += virtio_pmem_arguments(spec)
    if config.scratch_disk:
        args += ["-drive", f"file={state_dir}/scratch.img,format=raw,if=none,id=scratch,cache=unsafe",
                 "-device", "virtio-blk-pci,drive=scratch"]
    from labkit.backends.qemu_cmdline import without_append  # labkit's -append above has its parameters

    return args + list(without_append(config.qemu_args)) + list(config.extra_args)


def kvm_unusable_reason() -> str | None:
    """Why ``/dev/kvm`` can't be used, or ``None`` if it opens and creates a VM (worth a try)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {os.strerror(e.errno)}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return f"/dev/kvm: KVM API version {version}, expected {KVM_API_VERSION}"
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
    except OSError as e:
        return f"/dev/kvm: KVM_CREATE_VM failed: {os.strerror(e.errno)}"
    finally:
        os.close(fd)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def sweep_stale(tmp: str | None = None) -> list[str]:
    """Remove state directories whose Python process died without closing its VM (SIGKILL, a
    crashed kernel), killing their QEMU if it still runs. Returns the directories removed."""
    removed = []
    base = Path(tmp or tempfile.gettempdir())
    for directory in base.glob(f"{STATE_DIR_PREFIX}*"):
        try:
            owner, qemu_pid = (int(x) for x in (directory / "owner").read_text().split())
        except (OSError, ValueError):
            if time.time() - directory.stat().st_mtime < 60:
                continue  # being created right now
            owner, qemu_pid = -1, -1
        if owner > 0 and _pid_alive(owner):
            continue
        if qemu_pid > 0 and _pid_alive(qemu_pid):
            try:
                cmdline = Path(f"/proc/{qemu_pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if str(directory).encode() in cmdline:  # it is this directory's QEMU, not a reused pid
                os.kill(qemu_pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(str(directory))
    return removed


class QemuProcess:
    """One QEMU process in its private state directory."""

    def __init__(self, config: QemuConfig, kernel: str, initramfs: str, thp: bool = False,
                 qemu: str = QEMU_BINARY):
        if shutil.which(qemu) is None:
            raise FileNotFoundError(f"{qemu} is not installed (apt-get install qemu-system-x86)")
        sweep_stale()
        self.config = config
        self.state_dir = tempfile.mkdtemp(prefix=STATE_DIR_PREFIX)  # mode 0700
        self.qmp_path = f"{self.state_dir}/qmp.sock"
        self.serial_path = f"{self.state_dir}/serial.sock"
        self.stderr_path = f"{self.state_dir}/qemu.stderr"
        self.console_path = f"{self.state_dir}/console.log"
        self._readers: dict = {}
        self.args = qemu_command(config, self.state_dir, kernel, initramfs, qemu)
        if config.scratch_disk:
            with open(f"{self.state_dir}/scratch.img", "wb") as f:
                f.truncate(config.scratch_size or config.memory)  # sparse
        prefix = []
        if shutil.which("setpriv"):
            prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
        self.popen: subprocess.Popen | None = None
        try:
            with open(self.stderr_path, "wb") as err, _thp_lock:
                if not thp:
                    _set_thp_disable(True)  # inherited by the child across fork and exec
                try:
                    self.popen = subprocess.Popen(prefix + self.args, stdin=subprocess.DEVNULL,
                                                  stdout=err, stderr=err, start_new_session=True,
                                                  close_fds=True)
                finally:
                    if not thp:
                        _set_thp_disable(False)
            Path(f"{self.state_dir}/owner").write_text(f"{os.getpid()} {self.popen.pid}\n")
        except BaseException:
            self.stop()
            raise
        self.pid = self.popen.pid
        log.info("started QEMU pid %d in %s (%s)", self.pid, self.state_dir, config.accel)

    def forget_paths(self) -> None:
        """Unlink the sockets and the scratch disk once QEMU and labkit hold them open: even if
        Python is killed (a kernel restart), no socket is left behind; only the directory and its
        ``owner`` file stay until :func:`sweep_stale` (run by the next VM) removes them. The stderr
        and console logs stay readable through the descriptors kept here."""
        for name, path in (("stderr", self.stderr_path), ("console", self.console_path)):
            with contextlib.suppress(OSError):
                self._readers[name] = open(path, "rb")  # noqa: SIM115 - kept to read tails later
        for name in ("qmp.sock", "serial.sock", "scratch.img", "qemu.stderr", "console.log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.state_dir}/{name}")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stderr_tail(self, chars: int = 2000) -> str:
        return _tail(self._readers.get("stderr") or self.stderr_path, chars)

    def console_tail(self, chars: int = 2000) -> str:
        """The end of the guest's serial console (kernel messages: oopses, panics)."""
        return _tail(self._readers.get("console") or self.console_path, chars)

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; reap; remove the state directory."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


class QemuError(RuntimeError):
    """QEMU refused to start or died; the message ends with the tail of its stderr."""


def check_requirements() -> None:
    """Fail fast, before a guest image is built, when QEMU or qemu.qmp is missing."""
    if shutil.which(QEMU_BINARY) is None:
        raise FileNotFoundError(f"{QEMU_BINARY} is not installed (apt-get install qemu-system-x86)")
    if importlib.util.find_spec("qemu.qmp") is None:
        raise ModuleNotFoundError("the live backend needs the qemu.qmp library: "
                                  "pip install 'qemu.qmp>=0.0.3'")


def describe_exit(process: QemuProcess, when: str = "") -> str:
    """What QEMU's exit looked like: status or signal, its stderr (without its own "waiting for
    connection" notice), and the end of the guest console when the kernel said something there."""
    code = process.returncode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    stderr = "\n".join(line for line in process.stderr_tail(4000).splitlines()
                       if "QEMU waiting for connection" not in line)[-2000:]
    text = f"QEMU (pid {process.pid}) {how}{' ' + when if when else ''}"
    text += f"; its stderr ends:\n{stderr}" if stderr else " (nothing on its stderr)"
    console = process.console_tail(1500)
    if any(word in console for word in ("Kernel panic", "Oops", "BUG:", "Out of memory")):
        text += f"\nthe guest console ends:\n{console}"
    return text


def connect_serial(process: QemuProcess, timeout: float) -> socket.socket:
    """QEMU waits (``wait=on``) for this connection before it runs the guest: nothing is lost."""
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise QemuError(describe_exit(process, "before the guest started"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(process.serial_path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU's serial socket did not appear in {timeout:g} s:\n"
                                f"{process.stderr_tail()}") from None
            time.sleep(0.02)


def _tail(source, chars: int) -> str:
    """The last ``chars`` of a file, given its path or an open binary file."""
    try:
        f = open(source, "rb") if isinstance(source, str) else source  # noqa: SIM115
        try:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace").strip()
        finally:
            if isinstance(source, str):
                f.close()
    except (OSError, ValueError):
        return ""


def _set_thp_disable(disable: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_THP_DISABLE, int(disable), 0, 0, 0)
