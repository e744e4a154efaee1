"""A migration target: a second QEMU with the source's machine, waiting on ``-incoming``.

QEMU migrates a running guest to another QEMU started with the same devices and ``-incoming
tcp:HOST:PORT`` (docs/system/migration.rst): the target waits in runstate ``inmigrate`` until the
source's ``migrate`` connects, loads RAM and device state, and runs the guest on (``running``); the
source ends ``postmigrate``. :meth:`QemuBackend.start_incoming` starts one here, on 127.0.0.1 only,
and returns the URI to give ``migrate``; the target lives until the source VM is closed.

The target is built from the source's own :class:`~labkit.backends.qemu.process.QemuConfig` (same
memory backends, balloon with its iothread, virtio-mem devices), without a scratch disk: a disk's
contents are not migrated, so migration demos run without one.
"""

from __future__ import annotations

import contextlib
import socket
import time
import weakref
from dataclasses import replace

from labkit.backends.qemu.hostmem import read_host_memory
from labkit.backends.qemu.process import QemuConfig, QemuError, QemuProcess, connect_serial, node_sizes
from labkit.backends.qemu.qmp import QMPConnection

LISTEN_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_qemu_parts(parts: dict) -> None:
    """Stop a QEMU and close its channels (``parts``: its "qmp", "serial" and "process"); safe to
    call twice, after a crash, and at exit."""
    qmp, sock, process = parts.pop("qmp", None), parts.pop("serial", None), parts.pop("process", None)
    if qmp is not None:
        with contextlib.suppress(Exception):
            qmp.execute("quit", timeout=2.0)
        qmp.close()
    if sock is not None:
        sock.close()
    if process is not None:
        process.stop()


class IncomingTarget:
    """``qemu-system-x86_64 ... -incoming tcp:127.0.0.1:PORT`` for a source VM's configuration."""

    def __init__(self, config: QemuConfig, kernel: str, initramfs: str, thp: bool = False):
        self._parts: dict = {}
        self._finalizer = weakref.finalize(self, stop_qemu_parts, self._parts)
        last: Exception | None = None
        for _ in range(3):  # the port may be taken between free_port() and QEMU's bind
            self.port = free_port()
            self.uri = f"tcp:127.0.0.1:{self.port}"
            cfg = replace(config, scratch_disk=False, extra_args=(*config.extra_args, "-incoming", self.uri))
            try:
                self._start(cfg, kernel, initramfs, thp)
                break
            except (QemuError, OSError, TimeoutError) as e:
                last = e
                stop_qemu_parts(self._parts)
        else:
            raise QemuError(f"the migration target did not start: {last}")
        self.memory = config.memory
        self.node_sizes = (node_sizes(config.memory, config.numa_nodes)
                           + [d["size"] for d in config.virtio_mem])

    def _start(self, cfg: QemuConfig, kernel: str, initramfs: str, thp: bool) -> None:
        process = QemuProcess(cfg, kernel, initramfs, thp=thp)
        self._parts["process"] = self.process = process
        self._parts["serial"] = connect_serial(process, LISTEN_TIMEOUT_S)  # QEMU waits for it
        self._parts["qmp"] = self.qmp = QMPConnection(process.qmp_path, name="target")
        # qemu_init opens the -incoming listener before the monitor answers: once QMP reports
        # inmigrate, the target listens (a bind failure would have ended QEMU instead)
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while self.qmp.execute("query-status", {})["status"] != "inmigrate":
            if time.monotonic() > deadline:
                raise TimeoutError("the target never reached runstate inmigrate")
            time.sleep(0.05)
        process.forget_paths()

    def status(self) -> str:
        """The target's runstate: ``inmigrate`` until the source's state has been loaded."""
        return self.qmp.execute("query-status", {})["status"]

    def host_rss(self) -> int:
        """Bytes of guest RAM the target QEMU holds (a zero page it received stays unpopulated)."""
        return int(read_host_memory(self.process.pid, self.node_sizes)["guest_ram_rss"])

    def close(self) -> None:
        self._finalizer()
