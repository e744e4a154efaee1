"""Hot-plug commands of the model's monitor: ``object-add``, ``device_add``, ``device_del``,
``blockdev-add``, read as QEMU 7.2 reads them, in its order and with its texts (qom/object_interfaces.c
``user_creatable_add_type``, softmmu/qdev-monitor.c ``qdev_device_add_from_qdict`` and
``qmp_device_del``, blockdev.c ``qmp_blockdev_add``, backends/hostmem*.c; checked against
qemu-system-x86_64 7.2).

The model hot-adds ``memory-backend-file`` objects, ``virtio-pmem-pci`` devices on them (their
memory backend must be free and the guest able to hold their struct pages) and ``virtio-blk-pci``
disks on ``blockdev-add`` ``file`` nodes; ``device_del`` takes a disk away, refuses a hot-added
virtio-pmem device (QEMU 7.2: ``virtio based memory devices cannot be unplugged.``) and a device of
the command line (it sits on ``pcie.0``, which QEMU's q35 cannot hot-unplug from). The model has no
PCI topology: ``bus`` and ``addr`` are taken and not used. What QEMU accepts and the model does not
simulate is refused with a labkit text that says so. The devices do the work
(:class:`labkit.devices.virtio_pmem_vm.VirtioPmem`, :class:`labkit.devices.virtio_blk.VirtioBlk`);
the monitor keeps the objects and the QOM tree.

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0)
>>> vm.qmp("device_add", driver="virtio-net-pci", id="net0")
Traceback (most recent call last):
...
labkit.errors.QMPError: the model hot-adds virtio-pmem-pci and virtio-blk-pci only, got 'virtio-net-pci'
>>> vm.qmp("object-add", **{"qom-type": "memory-backend-file", "id": "m1", "size": "1M"})
Traceback (most recent call last):
...
labkit.errors.QMPError: Parameter 'size' expects uint64
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from labkit.backends.options import MemoryBackend
from labkit.backends.qapi import error, visit_struct
from labkit.backends.qemu_cmdline import id_wellformed
from labkit.devices import virtio_pmem
from labkit.devices.virtio_pmem import MEMMAP_MAX_SHARE, check_backing_file, memmap_bytes
from labkit.errors import QMPError
from labkit.units import PAGE_SIZE

HOTPLUG_DRIVERS = ("virtio-pmem-pci", "virtio-blk-pci")
# QEMU 7.2's qapi enums (query-qmp-schema): ObjectType and BlockdevDriver
OBJECT_TYPES = (
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus", "can-host-socketcan",
    "colo-compare", "cryptodev-backend", "cryptodev-backend-builtin", "cryptodev-backend-lkcf",
    "cryptodev-vhost-user", "dbus-vmstate", "filter-buffer", "filter-dump", "filter-mirror",
    "filter-redirector", "filter-replay", "filter-rewriter", "input-barrier", "input-linux", "iothread",
    "main-loop", "memory-backend-epc", "memory-backend-file", "memory-backend-memfd", "memory-backend-ram",
    "pef-guest", "pr-manager-helper", "qtest", "rng-builtin", "rng-egd", "rng-random", "secret",
    "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest", "throttle-group", "tls-creds-anon",
    "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object", "x-vfio-user-server")
BLOCKDEV_DRIVERS = (
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
    "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels",
    "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi",
    "vhdx", "vmdk", "vpc", "vvfat")
ON_OFF_AUTO = ("on", "off", "auto")
# MemoryBackendFileProperties in the schema's order (size and mem-path required)
MEMORY_BACKEND_FILE_MEMBERS = {
    "dump": "bool", "host-nodes": "array", "merge": "bool",
    "policy": ("default", "preferred", "bind", "interleave"), "prealloc": "bool",
    "prealloc-threads": "uint32",
    "prealloc-context": "str", "share": "bool", "reserve": "bool", "size": "size",
    "x-use-canonical-path-for-ramblock-id": "bool", "align": "size", "discard-data": "bool",
    "mem-path": "str", "pmem": "bool", "readonly": "bool"}
UNMODELLED_BACKEND_PROPERTIES = {"prealloc-threads": None, "prealloc-context": None, "align": None,
                                 "discard-data": False, "pmem": False, "readonly": False}
# BlockdevOptions: the base members, then the variant's (file, raw) in the schema's order
BLOCKDEV_BASE = {"driver": BLOCKDEV_DRIVERS, "node-name": "str", "discard": ("ignore", "unmap"),
                 "cache": "object", "read-only": "bool", "auto-read-only": "bool", "force-share": "bool",
                 "detect-zeroes": ("off", "on", "unmap")}
BLOCKDEV_VARIANTS = {
    "file": ({"filename": "str", "pr-manager": "str", "locking": ("auto", "on", "off"),
              "aio": ("threads", "native", "io_uring"), "aio-max-batch": "int", "drop-cache": "bool",
              "x-check-cache-dropped": "bool"}, ("filename",)),
    "raw": ({"file": "any", "offset": "int", "size": "int"}, ("file",)),
}
# the properties of the devices the model hot-adds (qdev), by name
HOTPLUG_PROPERTIES = {
    "virtio-pmem-pci": ("memdev", "memaddr", "bus", "addr"),
    "virtio-blk-pci": ("drive", "write-cache", "bus", "addr"),
}


VIRTIO_BLK_QOM = SimpleNamespace(QOM_TYPE="virtio-blk-pci", QOM_VIRTIO_TYPE="virtio-blk-device",
                                 QOM_PROPERTIES=())


def _device_ids(monitor: Any) -> set[str]:
    """The ids taken under /machine/peripheral."""
    return {o.path.rsplit("/", 1)[1] for o in monitor.qom.children("/machine/peripheral")}


def _opts_value(value: Any) -> str | None:
    """qemu_opts_from_qdict_entry: device_add's properties become QemuOpts strings (a number in
    decimal, a bool as on/off); a list, an object or null is dropped."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float | str):
        return str(value) if not isinstance(value, float) else f"{value:.17g}"
    return None


# --- device_add / device_del ---------------------------------------------------------------------
def device_add(monitor: Any, args: dict) -> dict:
    """qdev_device_add_from_qdict after qemu_opts_from_qdict: the id (a string, or none: an
    anonymous device), the driver, the properties as QemuOpts strings, then realize's checks."""
    driver = _opts_value(args["driver"])
    if driver is None:
        raise error("Parameter 'driver' is missing")
    device_id = args.get("id") if isinstance(args.get("id"), str) else None  # not a string: anonymous
    if device_id is not None and not id_wellformed(device_id):
        raise error("Parameter 'id' expects an identifier")
    if driver not in HOTPLUG_DRIVERS:
        raise error(f"the model hot-adds virtio-pmem-pci and virtio-blk-pci only, got '{driver}'")
    if device_id in _device_ids(monitor):
        raise error(f"Duplicate device ID '{device_id}'")
    props = {}
    for name, value in args.items():
        if name in ("driver", "id"):
            continue
        if name not in HOTPLUG_PROPERTIES[driver]:
            raise error(f"Property '{driver}.{name}' not found")
        text = _opts_value(value)
        if text is not None:
            props[name] = text
    if "memaddr" in props:
        try:
            int(props["memaddr"], 0)
        except ValueError:
            raise error("Parameter 'memaddr' expects integer") from None
        raise error("labkit's model places hot-added virtio-pmem regions itself: leave out memaddr")
    vm = monitor.vm
    if driver == "virtio-blk-pci":
        wc = props.get("write-cache", "auto")
        if wc not in ON_OFF_AUTO:
            raise error(f"Parameter 'write-cache' does not accept value '{wc}'")
        if "drive" not in props:
            raise error("drive property not set")
        if device_id is None:
            raise error("labkit's model names a virtio-blk disk by its id (the guest ops take it): "
                        "give id=...")
        blk = vm.virtio_pmem.blk
        node = blk.nodes.get(props["drive"])
        user = next((d.id for d in blk.devices.values() if node is not None and d.node is node), None)
        if user is not None:  # the block layer's permission check (block.c bdrv_check_perm)
            raise error(f"Permission conflict on node '{node.node_name}': permissions 'write' are both "
                        f"required by block device '/machine/peripheral/{user}/virtio-backend' (uses "
                        f"node '{node.node_name}' as 'root' child) and unshared by block device "
                        f"'/machine/peripheral/{device_id}/virtio-backend' (uses node '{node.node_name}' as "
                        f"'root' child).")
        blk.device_add({"drive": props["drive"], "id": device_id, "write-cache": wc})
        monitor._add_virtio(f"/machine/peripheral/{device_id}", blk.devices[device_id], VIRTIO_BLK_QOM)
        return {}
    return _pmem_add(monitor, device_id, props)


def _pmem_add(monitor: Any, device_id: str | None, props: dict) -> dict:
    memdev = props.get("memdev")
    if memdev is None:
        raise error("'memdev' property must be set")
    backend = monitor.backends.get(memdev)
    if backend is None:
        raise QMPError("DeviceNotFound", f"Device '{memdev}' not found")  # the memdev link
    if memdev in monitor.busy:
        raise error(f"can't use already busy memdev: {memdev}")
    if backend.mem_path is None:
        raise error(f"labkit's virtio-pmem maps a file: its memdev must be a memory-backend-file, "
                    f"got {backend.qom_type} '{memdev}'")
    # the struct-page rule of labkit.open, for the regions after this one is added
    vm = monitor.vm
    pmem = vm.virtio_pmem
    need = sum(memmap_bytes(d.config.size) for d in pmem.devices) + memmap_bytes(backend.size)
    if need > vm.memory // MEMMAP_MAX_SHARE:
        raise error(f"the guest's {vm.memory >> 20} MiB cannot hold {need >> 20} MiB of struct pages for "
                    f"its virtio-pmem regions")
    device = pmem.plug({"id": device_id, "path": backend.mem_path, "size": backend.size,
                        "share": backend.share}, memdev)
    monitor.add_memory_device(device, virtio_pmem)
    return {}


def device_del(monitor: Any, args: dict) -> dict:
    """qmp_device_del: by id or QOM path; a device of the command line is on pcie.0 (no hotplug);
    a virtio-pmem device refuses (pc_virtio_md_pci_unplug_request, QEMU 7.2)."""
    device_id = args["id"]
    vm = monitor.vm
    path = device_id if device_id.startswith("/") else f"/machine/peripheral/{device_id}"
    obj, _ = monitor.qom.lookup(path)
    if obj is None or obj.device is None or obj.path.startswith("/objects/") or obj.path.endswith(
            "/virtio-backend"):
        raise QMPError("DeviceNotFound", f"Device '{device_id}' not found")
    if obj.path in monitor.cold_plugged:
        raise error("Bus 'pcie.0' does not support hotplugging")
    if any(obj.device is d for d in vm.virtio_pmem.devices):
        raise error("virtio based memory devices cannot be unplugged.")
    blk = vm.virtio_pmem.blk
    name = obj.path.rsplit("/", 1)[1]
    blk.device_del(name)
    monitor.qom.objects = [o for o in monitor.qom.objects
                           if o.path != obj.path and not o.path.startswith(obj.path + "/")]
    vm.event_queue.emit("DEVICE_DELETED", {"device": name, "path": obj.path})
    return {}


# --- object-add ----------------------------------------------------------------------------------
def object_add(monitor: Any, args: dict) -> dict:
    """user_creatable_add_qapi: the members visited in the schema's order, the id, the properties'
    setters, the id taken in /objects, then the backing file opened."""
    qom_type = args["qom-type"]
    if qom_type != "memory-backend-file":
        raise error(f"the model's object-add creates memory-backend-file objects only, got '{qom_type}'")
    rest = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
    props = visit_struct("", rest, MEMORY_BACKEND_FILE_MEMBERS, ("size", "mem-path"))
    object_id = args["id"]
    if not id_wellformed(object_id):
        raise error("Parameter 'id' expects an identifier")
    size, path = props["size"], props["mem-path"]
    if size == 0:
        raise error("property 'size' of memory-backend-file doesn't take value '0'")
    if props.get("prealloc") and props.get("reserve") is False:
        raise error("'prealloc=on' and 'reserve=off' are incompatible")
    if props.get("host-nodes") and props.get("policy", "default") == "default":
        raise error("host-nodes must be empty for policy default, or you should explicitly specify a "
                    "policy other than default")
    for name, default in UNMODELLED_BACKEND_PROPERTIES.items():
        if name in props and props[name] != default:
            raise error(f"labkit's model does not simulate memory-backend-file property '{name}'")
    for name in ("prealloc", "host-nodes"):
        if props.get(name):
            raise error(f"labkit's model does not simulate memory-backend-file property '{name}' "
                        f"(prealloc=on would read the whole file in; host-nodes binds host NUMA nodes)")
    if object_id in monitor.backends:
        raise error(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
    if -(-size // PAGE_SIZE) * PAGE_SIZE >= 1 << 64:  # QEMU aligns to the page: it wraps to 0
        raise error("memory size 0x0 must be equal to or larger than page size 0x1000")
    if size % PAGE_SIZE:
        raise error(f"labkit's model needs a memory-backend-file size of whole 4 KiB pages, got "
                    f"0x{size:x} (QEMU would round it up)")
    try:
        check_backing_file(path, size, object_id)
    except ValueError as e:
        raise error(str(e)) from None
    monitor.add_backend(MemoryBackend(object_id, "memory-backend-file", size, share=props.get("share", False),
                                      mem_path=path, merge=props.get("merge", True),
                                      dump=props.get("dump", True), policy=props.get("policy", "default")))
    return {}


# --- blockdev-add --------------------------------------------------------------------------------
def blockdev_add(monitor: Any, args: dict) -> dict:
    """qmp_blockdev_add: BlockdevOptions visited (base members, then the driver's), the root's
    node-name required and well-formed, then the driver opens its file."""
    driver = args["driver"]
    members, required = BLOCKDEV_VARIANTS.get(driver, ({}, ()))
    if driver not in BLOCKDEV_VARIANTS:
        raise error(f"the model's blockdev-add takes driver 'file' (a raw image), got '{driver}'")
    options = visit_struct("", args, BLOCKDEV_BASE | members, ("driver", *required))
    if "cache" in options:
        options["cache"] = visit_struct("cache", options["cache"], {"direct": "bool", "no-flush": "bool"})
        if not options["cache"]:  # flattened, an empty struct leaves 'cache' for the driver
            raise error(f"Block protocol '{driver}' doesn't support the option 'cache'")
    name = options.get("node-name")
    if name is None:
        raise error("'node-name' must be specified for the root node")
    if not id_wellformed(name):
        raise error(f"Invalid node-name: '{name}'")
    if driver == "raw":
        raise error("the model's blockdev-add takes driver 'file' (a raw image), got 'raw'")
    if options.get("aio") == "native" and not options.get("cache", {}).get("direct", False):
        raise error("aio=native was specified, but it requires cache.direct=on, which was not specified.")
    return monitor.vm.virtio_pmem.blk.blockdev_add(options)


__all__ = ["BLOCKDEV_DRIVERS", "HOTPLUG_DRIVERS", "OBJECT_TYPES", "blockdev_add", "device_add", "device_del",
           "object_add"]
