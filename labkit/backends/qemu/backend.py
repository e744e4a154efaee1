"""QemuBackend: a real Linux guest under QEMU, behind the same methods as ModelBackend.

>>> vm = open_qemu(memory="512M", balloon={"deflate_on_oom": True})  # doctest: +SKIP
>>> vm.qmp("balloon", value=384 << 20); vm.advance(2000)  # doctest: +SKIP
>>> vm.qmp("query-balloon")  # doctest: +SKIP
{'actual': 402653184}
>>> vm.close()  # doctest: +SKIP

The options are those of :func:`labkit.open`. What differs from the model:

* ``seed`` is ignored (a real guest is not seeded), and so are ``model`` (model-only knobs) and
  ``host`` (the host is this machine: its RAM, swap and discard behaviour are real; a warning says so
  when non-default values are given).
* ``cmdline`` entries become guest kernel parameters (``{"init_on_free": 1}`` → ``init_on_free=1``).
* ``virtio_mem`` (a list of device property dicts, validated as on the model) and
  ``memhp_default_state`` become ``virtio-mem-pci`` devices on their own ``memory-backend-ram``
  (``-m ...,maxmem=...``) and the guest's kernel parameter; ``guest("memory_blocks")`` and
  ``guest("online_memory", zone=...)`` read and online the guest's memory blocks from sysfs.
* ``virtio_pmem`` (the model's specs: ``id``, ``path`` of an existing raw file, ``size``, ``share``)
  becomes a ``memory-backend-file`` + ``virtio-pmem-pci`` each, and the ``pmem_*`` guest ops work on
  ``/dev/pmemN`` (:mod:`labkit.backends.qemu.pmem`).
* ``qemu`` holds live-only knobs: ``accel`` (``"auto"``: KVM when it boots a guest, else TCG),
  ``kernel`` (a vmlinuz), ``thp`` (``False``: QEMU runs with transparent huge pages disabled, so the
  host backs guest RAM in 4 KiB pages like the model; ``True``: the host's own THP policy),
  ``boot_timeout_s``, ``kvm_boot_timeout_s``, ``scratch_disk``, ``smp``, ``extra_args``, ``poll_ms``,
  ``pvh`` (``False``: boot the bzImage rather than the uncompressed kernel's PVH entry).
* time is wall-clock: ``advance(ms)`` really waits (polling QMP, host RSS and QEMU's health) and
  ``t_ms`` counts from the moment the guest shell was ready.
* ``snapshot()`` raises: the page states of a real guest can't be read from outside.
* the open problems' switches (docs/mechanisms.md §12) run where this machine can run them
  (hugetlbfs backing when the huge page pool has the pages) and are refused before QEMU starts,
  with the reason, where it can't (vfio-pci without an IOMMU group, SEV without /dev/sev,
  sev-snp-guest and tdx-guest missing from this QEMU, 64 KiB pages): :mod:`labkit.backends.qemu.switches`.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from dataclasses import asdict
from typing import Any

import psutil

from labkit.backends.base import check_ms
from labkit.backends.guest_ops import check as check_guest_op
from labkit.backends.options import VmOptions, cmdline_from_keywords, parse_options
from labkit.backends.qapi import from_python
from labkit.backends.qemu import accel as accel_choice
from labkit.backends.qemu.guest import OPS, LiveGuestOps, parse_meminfo, parse_vmstat
from labkit.backends.qemu.guestfiles import MODULE_FAILED_MARKER, READY_MARKER
from labkit.backends.qemu.hostmem import read_host_memory
from labkit.backends.qemu.image import GuestImage, build_guest_image
from labkit.backends.qemu.inspect import LiveInspection
from labkit.backends.qemu.migrate import stop_qemu_parts
from labkit.backends.qemu.pmem import PMEM_OPS, LivePmem
from labkit.backends.qemu.process import (
    QemuConfig,
    QemuError,
    QemuProcess,
    check_requirements,
    connect_serial,
    describe_exit,
)
from labkit.backends.qemu.qmp import ConnectError, QMPConnection, QMPConnectionLost, migration_sample
from labkit.backends.qemu.serial import GuestDied, GuestTimeout, SerialShell
from labkit.backends.qemu.switches import refusal as switch_refusal
from labkit.errors import GuestError, NotOnThisHost
from labkit.units import format_size

log = logging.getLogger("labkit.qemu")

STEP_MS = 100.0
TRACE_POINTS = 200_000


def _shutdown(parts: dict) -> None:
    """Stop QEMU and close its channels; safe to call twice, after a crash, and at exit."""
    target = parts.pop("target", None)
    if target is not None:  # a migration target (start_incoming)
        target.close()
    stop_qemu_parts(parts)


class QemuBackend(LiveInspection):
    """A live VM. See the module docstring and :func:`labkit.open` for the arguments."""

    name = "qemu"

    def __init__(self, options: VmOptions | None = None, /, **keywords: Any):
        if options is None:
            options = parse_options("qemu", **keywords)
        elif keywords:
            raise TypeError(f"pass VmOptions or keywords, not both (got {sorted(keywords)})")
        self.options = options
        knobs = options.qemu
        self.virtio_mem_specs = [d.spec() for d in options.virtio_mem]
        self.virtio_pmem_specs = [d.spec() for d in options.virtio_pmem]
        self.memhp_default_state = options.memhp_default_state
        self.cmdline = options.kernel_params
        self.memory, self.seed, self.vm_name = options.memory, options.seed, options.vm_name
        self.knobs = asdict(knobs)
        self.balloon_options = options.balloon.properties() if options.balloon is not None else None
        self.numa_nodes = options.numa_nodes
        self.node_sizes = list(options.node_sizes) + [d["size"] for d in self.virtio_mem_specs]
        self.open_options = dict(options.keywords) | {"backend": "qemu"}
        check_requirements()
        why = switch_refusal(options)  # the open problems' switches this machine can't run
        if why is not None:
            raise NotOnThisHost(why)
        self.image: GuestImage = build_guest_image(knobs.kernel)
        self.closed = False
        self._parts: dict = {}
        self._finalizer = weakref.finalize(self, _shutdown, self._parts)
        self.balloon_target = options.memory
        self.trace: deque[tuple[float, int, int]] = deque(maxlen=TRACE_POINTS)  # (t_ms, actual, rss)
        try:  # boot and the devices' drivers; on any failure QEMU is stopped here, not at GC
            self._boot()
            self.ops = LiveGuestOps(self._run, options.memory, self.image.helper, bool(knobs.scratch_disk),
                                    memory_devices=self._memory_devices)
            if self.virtio_mem_specs:  # the driver plugs requested-size as soon as it probes
                self._run("insmod /lib/modules/virtio_mem.ko", timeout=60)
            self.pmem = LivePmem(self.virtio_pmem_specs, self._run, lambda: self.qmp("query-memory-devices"),
                                 lambda: self.process.pid, list(self.image.modules), self.image.builtin)
        except BaseException:
            self.close()
            raise
        for op in PMEM_OPS:  # on every VM, as on the model (no device: the model's error)
            self.ops.extra_ops[op] = lambda arguments, op=op: self.pmem.call(op, arguments)
        self.ops.sync_extra = self.pmem.sync_command

    @staticmethod
    def _kernel_params(cmdline: dict | None) -> str:
        """The ``cmdline`` option as guest kernel parameters (checked as on the model)."""
        return cmdline_from_keywords(cmdline)[1]

    # --- boot ---------------------------------------------------------------------------------
    def _config(self, accel: str) -> QemuConfig:
        k, o = self.options.qemu, self.options
        return QemuConfig(memory=self.memory, balloon=self.balloon_options, numa_nodes=self.numa_nodes,
                          accel=accel, smp=o.smp, cmdline=self.cmdline,
                          scratch_disk=bool(k.scratch_disk), bios=k.bios,
                          extra_args=tuple(k.extra_args), virtio_mem=tuple(self.virtio_mem_specs),
                          memhp_default_state=self.memhp_default_state,
                          virtio_pmem=tuple(self.virtio_pmem_specs), maxmem=o.maxmem,
                          qemu_args=o.qemu_args, from_line=o.from_line)

    def _boot(self) -> None:
        accel, self.accel_reason = accel_choice.choose(self.knobs["accel"])
        if accel == "kvm":
            try:
                self._start("kvm", self.knobs["kvm_boot_timeout_s"])
                return
            except (QemuError, GuestError) as e:
                if self.knobs["accel"] == "kvm":
                    raise
                reason = f"KVM boot failed: {str(e).strip().splitlines()[0].split('; last output')[0][:200]}"
                accel_choice.remember_kvm_failure(reason)
                log.warning("%s; falling back to TCG", reason)
                self.accel_reason = reason
                _shutdown(self._parts)
        self._start("tcg", self.knobs["boot_timeout_s"])

    def _start(self, accel: str, timeout: float) -> None:
        started = time.monotonic()
        self.accel = accel
        kernel = self.image.boot_kernel if self.knobs["pvh"] else self.image.kernel
        process = QemuProcess(self._config(accel), str(kernel), str(self.image.initramfs),
                              thp=bool(self.knobs["thp"]))
        self._parts["process"] = process
        self.process = process
        sock = connect_serial(process, 30.0)
        self.serial = SerialShell(sock, alive=process.alive)
        self._parts["serial"] = self.serial
        try:
            self.qmp_conn = QMPConnection(process.qmp_path, name=self.vm_name)
            self._parts["qmp"] = self.qmp_conn
            console = self.serial.wait_for(READY_MARKER, timeout)
        except (GuestDied, QMPConnectionLost, ConnectError, ConnectionError, OSError) as e:
            raise self._died(e) from None
        except GuestTimeout as e:
            raise GuestTimeout(f"the guest did not boot within {timeout:g} s under {accel}: {e}") from None
        process.forget_paths()  # connected for good: no socket (or disk image) left on disk from here on
        failed = [line.split()[1] for line in console.splitlines() if line.startswith(MODULE_FAILED_MARKER)]
        if failed:
            log.warning("guest modules that failed to load: %s", failed)
        self.modules_failed = failed
        self.boot_s = time.monotonic() - started
        ready = console[console.rfind(READY_MARKER):].split()
        # the guest's own share of boot_s (kernel + /init); the rest is QEMU, firmware and loading
        self.guest_boot_s = float(ready[3]) if len(ready) > 3 else None
        self._t0 = time.monotonic()
        log.info("guest ready in %.1f s under %s (%s; guest uptime %s s)", self.boot_s, accel,
                 self.accel_reason, self.guest_boot_s)

    def _died(self, cause: BaseException) -> QemuError:
        process = self._parts.get("process") or getattr(self, "process", None)
        if process is not None:
            deadline = time.monotonic() + 2.0
            while process.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not process.alive():
                return QemuError(describe_exit(process))
        return QemuError(f"lost the guest: {cause}")

    # --- channels -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this VM was closed; open a new one with labkit.open()")

    def _run(self, command: str, timeout: float = 30.0, check: bool = True) -> tuple[str, int]:
        self._check_open()
        try:
            return self.serial.run(command, timeout=timeout, check=check)
        except GuestDied as e:
            raise self._died(e) from None

    def hmp(self, command_line: str) -> str:
        """An HMP line through ``human-monitor-command``: QEMU's own answer."""
        return self.qmp("human-monitor-command", **{"command-line": command_line})

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on QEMU; QEMU's errors come back as :class:`labkit.QMPError`."""
        self._check_open()
        arguments = from_python(arguments)  # numpy's numbers as JSON numbers; NaN: QEMU's parse error
        try:
            result = self.qmp_conn.execute(command, arguments)
        except QMPConnectionLost as e:
            raise self._died(e) from None
        if command == "balloon":
            self.balloon_target = int(arguments["value"])
        elif command == "human-monitor-command":  # HMP's balloon N (MiB) sets the target too
            words = str(arguments.get("command-line", "")).split()
            if len(words) == 2 and words[0] == "balloon" and words[1].isdigit() and result == "":
                self.balloon_target = int(words[1]) << 20
        return result

    # --- migration ----------------------------------------------------------------------------
    def start_incoming(self) -> str:
        """Start a second QEMU with this VM's machine waiting on ``-incoming tcp:127.0.0.1:PORT``
        (:mod:`labkit.backends.qemu.migrate`) and return that URI for ``qmp("migrate", uri=...)``.
        It is stopped with this VM."""
        self._check_open()
        from labkit.backends.qemu.migrate import IncomingTarget

        if self._parts.get("target") is not None:
            self._parts.pop("target").close()
        kernel = self.image.boot_kernel if self.knobs["pvh"] else self.image.kernel
        target = IncomingTarget(self._config(self.accel), str(kernel), str(self.image.initramfs),
                                thp=bool(self.knobs["thp"]))
        self._parts["target"] = target
        return target.uri

    @property
    def migration_target(self):
        """The :class:`~labkit.backends.qemu.migrate.IncomingTarget` of :meth:`start_incoming`."""
        return self._parts.get("target")

    # --- guest --------------------------------------------------------------------------------
    def guest(self, op: str, **arguments: Any) -> Any:
        """Run a workload step in the guest: alloc, touch, read, free, drop_caches, sync, handles."""
        self._check_open()
        if op in OPS or op in self.ops.extra_ops:  # the same argument checks as on the model
            arguments = check_guest_op(op, arguments)
        return self.ops.call(op, arguments)

    def meminfo(self) -> dict[str, int]:
        return parse_meminfo(self._run("cat /proc/meminfo")[0])

    def vmstat(self) -> dict[str, int]:
        return parse_vmstat(self._run("cat /proc/vmstat")[0])

    def dmesg(self) -> list[str]:
        return self._run("dmesg")[0].splitlines()

    def buddyinfo(self) -> str:
        return self._run("cat /proc/buddyinfo")[0]

    def zoneinfo(self) -> list[dict]:
        """/proc/zoneinfo per node and populated zone, with the model's keys (free, min, low, high,
        spanned, present, managed, protection, start_pfn, pcp per CPU)."""
        from labkit.model.procfs import parse_zoneinfo

        return parse_zoneinfo(self._run("cat /proc/zoneinfo")[0])

    # --- time ---------------------------------------------------------------------------------
    @property
    def now_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000.0

    def _memory_devices(self) -> list[dict]:
        """virtio-mem devices as ``query-memory-devices`` reports them (``data`` of each)."""
        return [d["data"] for d in self.qmp("query-memory-devices") if d.get("type") == "virtio-mem"]

    def host_memory(self) -> dict[str, int]:
        try:
            return read_host_memory(self.process.pid, self.node_sizes)
        except OSError as e:
            raise self._died(e) from None

    def _poll(self) -> None:
        if not self.process.alive():
            raise self._died(RuntimeError("QEMU exited"))
        actual = self.qmp("query-balloon")["actual"] if self.balloon_options is not None else self.memory
        self.trace.append((self.now_ms, actual, self.host_memory()["guest_ram_rss"]))

    def advance(self, ms: float) -> None:
        """Wait ``ms`` milliseconds of wall-clock time, polling QMP, host RSS and QEMU's health."""
        self._check_open()
        ms = check_ms(ms, "advance()", self.now_ms)
        end = time.monotonic() + ms / 1000.0
        self._poll()
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, self.knobs["poll_ms"] / 1000.0))
            self._poll()

    def step(self, max_ms: float = STEP_MS) -> bool:
        """Wait for the next BALLOON_CHANGE event, at most ``max_ms`` (default ~100 ms).

        Returns False at once when the balloon has reached its target (nothing to do), else whether
        ``actual`` moved."""
        self._check_open()
        max_ms = check_ms(max_ms, "step() max_ms", self.now_ms)
        if self.balloon_options is None:
            return False
        before = self.qmp("query-balloon")["actual"]
        if before == self.balloon_target:
            return False
        self.qmp_conn.wait_event("BALLOON_CHANGE", self.qmp_conn.event_count, max_ms / 1000.0)
        self._poll()
        return self.trace[-1][1] != before

    # --- observation --------------------------------------------------------------------------
    def sample(self) -> dict[str, float]:
        """One row of metrics with the model's keys (bytes), plus QEMU's whole-process RSS."""
        out = self._run("cat /proc/meminfo; echo @@; cat /proc/vmstat")[0]
        meminfo_text, _, vmstat_text = out.partition("@@\n")
        info, vmstat = parse_meminfo(meminfo_text), parse_vmstat(vmstat_text)
        actual = self.qmp("query-balloon")["actual"] if self.balloon_options is not None else self.memory
        host = self.host_memory()
        return {
            "t_ms": self.now_ms,
            "memtotal": info["MemTotal"] * 1024,
            "memfree": info["MemFree"] * 1024,
            "memavailable": info["MemAvailable"] * 1024,
            "cached": info["Cached"] * 1024,
            "anon": info["AnonPages"] * 1024,
            "balloon_actual": actual,
            "balloon_target": self.balloon_target if self.balloon_options is not None else self.memory,
            "balloon_size": self.memory - actual,
            "host_rss": host["guest_ram_rss"],
            "host_swap": host["guest_ram_swap"],
            "host_free": psutil.virtual_memory().available,
            "oom_kills": vmstat.get("oom_kill", 0),
            "qemu_rss": host["qemu_rss"],
            "qemu_rss_anon": host["qemu_rss_anon"],
            "qemu_rss_file": host["qemu_rss_file"],
            "guest_dirty": info.get("Dirty", 0) * 1024,
        } | self.pmem.sample() | self._virtio_mem_sample() | migration_sample(self.qmp)

    def _virtio_mem_sample(self) -> dict:
        if not self.virtio_mem_specs:
            return {}
        devices = self._memory_devices()
        return {"virtio_mem_plugged": sum(d["size"] for d in devices),
                "virtio_mem_requested": sum(d["requested-size"] for d in devices)}

    def snapshot(self) -> dict:
        raise NotImplementedError(
            "the live backend has no page map: a real guest's page states can't be read from "
            "outside. Use labkit.open(backend='model') for the page map, and sample() here for totals")

    def events(self) -> list[dict]:
        return self.qmp_conn.events()

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop QEMU (by PID), close QMP and the console, remove the sockets' directory."""
        self.closed = True
        self._finalizer()

    def __enter__(self) -> QemuBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pid {self.process.pid}"
        return f"<QemuBackend {format_size(self.memory)} {getattr(self, 'accel', '?')} {state}>"


def open_qemu(options: VmOptions | None = None, /, **keywords: Any) -> QemuBackend:
    """Boot a live VM with the options of :func:`labkit.open` (see :class:`QemuBackend`)."""
    return QemuBackend(options, **keywords)

