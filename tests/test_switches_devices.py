"""Device assignment, confidential guests, locked memory and the balloon's 32-bit interface, as QEMU
takes them on its command line (docs/mechanisms.md §12.2-§12.5). QEMU 7.2 source unless said; the
SEV-SNP and TDX behaviour follows QEMU 9.1-10.1 (patches, cited in the docs)."""

from __future__ import annotations

import pytest

import labkit
from labkit.backends.options import parse_options
from labkit.backends.qemu.switches import refusal
from labkit.devices.balloon import STAT_UNSET, BalloonDevice
from labkit.errors import HostOutOfMemory, QMPError
from labkit.model.backing import RamDiscard
from labkit.units import TiB

MiB, GiB = 1 << 20, 1 << 30
VMEM = ("-m 1G,maxmem=2G -object memory-backend-ram,id=vm0mem,size=1G "
        "-device virtio-mem-pci,id=vm0,memdev=vm0mem,requested-size=512M")
SEV = "-object sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1 -machine confidential-guest-support=sev0"
SNP = "-object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1 -machine confidential-guest-support=sev0"
TDX = "-object tdx-guest,id=tdx0 -machine confidential-guest-support=tdx0"
BALLOON = " -device virtio-balloon-pci,free-page-reporting=on"


def open_vm(line: str, **kw):
    return labkit.open(backend="model", qemu_args=line, model={"boot": "minimal"},
                       memhp_default_state="online_movable", **kw)


def churn(vm, size: int = 500 * MiB) -> None:
    vm.guest("free", handle=vm.guest("alloc", size=size))


def inflate(vm, to: int) -> tuple[int, int]:
    """(host RSS freed, MemTotal lost) by inflating to ``to``."""
    rss, total = vm.sample()["host_rss"], vm.sample()["memtotal"]
    vm.qmp("balloon", value=to)
    vm.advance(10_000)
    assert vm.qmp("query-balloon")["actual"] == to  # QEMU acks every request
    return rss - vm.sample()["host_rss"], total - vm.sample()["memtotal"]


# --- QEMU's RAM discard counters ----------------------------------------------------------------
def test_ram_discard_counters_are_qemus():
    """softmmu/physmem.c: VFIO's uncoordinated disable and virtio-mem's coordinated require live
    together; SEV's plain disable does not live with virtio-mem (-EBUSY either way round)."""
    d = RamDiscard()
    assert d.coordinated_require(True) == 0 and d.uncoordinated_disable(True) == 0
    assert d.disable(True) == -16 and d.is_disabled()
    e = RamDiscard()
    assert e.disable(True) == 0 and e.coordinated_require(True) == -16
    f = RamDiscard()
    assert f.require(True) == 0 and f.uncoordinated_disable(True) == -16


# --- VFIO ---------------------------------------------------------------------------------------
def test_vfio_pins_all_ram_and_uncoordinated_discard_frees_nothing():
    """hw/vfio/common.c: vfio_ram_block_discard_disable -> ram_block_uncoordinated_discard_disable for
    a type1 IOMMU; the DMA map pins every page (host RSS = guest RAM from the start). The balloon is
    still acked and the guest still loses the memory (virtio_balloon_inhibited), reporting too."""
    vm = open_vm("-m 1G -device vfio-pci,host=0000:01:00.0" + BALLOON)
    host = vm.inspect("host")
    assert vm.sample()["host_rss"] == GiB and host.discard_counters["uncoordinated_disabled"] == 1
    churn(vm)
    freed, lost = inflate(vm, 512 * MiB)
    assert freed == 0 and lost == 512 * MiB  # no deflate-on-oom: MemTotal shrinks
    vm.advance(10_000)
    assert vm.reporting.reports > 0 and vm.reporting.discarded_pages == 0
    assert vm.reporting.skipped_reports == vm.reporting.reports
    assert vm.sample()["host_rss"] == GiB


def test_vfio_keeps_virtio_mem_working_through_coordinated_discard():
    """virtio-mem requires coordinated discard (virtio_mem_device_realize) and VFIO's RamDiscardListener
    maps plugged blocks (pins them) and unmaps them before the unplug discards (vfio_ram_discard_*,
    QEMU 6.1+): the one mechanism that still gives memory back."""
    vm = open_vm(VMEM + " -device vfio-pci,host=01:00.0")
    vm.advance(3000)
    assert vm.qmp("qom-get", path="vm0", property="size") == 512 * MiB
    assert vm.sample()["host_rss"] == GiB + 512 * MiB  # boot RAM and the plugged blocks, pinned
    vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
    vm.advance(10_000)
    assert vm.qmp("qom-get", path="vm0", property="size") == 0
    assert vm.sample()["host_rss"] == GiB


def test_vfio_blocks_migration_unless_the_device_can_migrate():
    """hw/vfio/migration.c vfio_migration_probe (QEMU 7.2): x-enable-migration is off by default and
    a blocker says "VFIO device doesn't support migration"."""
    vm = open_vm("-m 1G -device vfio-pci,host=01:00.0")
    with pytest.raises(QMPError, match="^VFIO device doesn't support migration$"):
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    vm = open_vm("-m 1G -device vfio-pci,host=01:00.0,x-enable-migration=on")
    vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    assert vm.qmp("query-migrate")["status"] in ("setup", "active", "completed")


def test_pinned_memory_is_never_swapped():
    host = labkit.model.host.Host(ram=int(1.5 * GiB), swap=4 * GiB)
    pinned = labkit.open(backend="model", qemu_args="-m 1G -device vfio-pci,host=01:00.0", host=host,
                         model={"boot": "minimal"})
    other = labkit.open(backend="model", memory="1G", host=host, model={"boot": "minimal"},
                        vm_name="other")
    with pytest.raises(HostOutOfMemory):  # 700 MiB: what the 1 GiB guest can hold (900 MiB meets
        other.guest("alloc", size=700 * MiB)  # its own OOM killer first); only other's own pages
    assert pinned.kernel.host_vm.swap_outs == 0  # could go, and they are in use
    assert pinned.sample()["host_rss"] == GiB


@pytest.mark.parametrize("props, text", [
    ("", "No provided host device\nUse -device vfio-pci,host=DDDD:BB:DD.F or -device vfio-pci,"
         "sysfsdev=PATH_TO_DEVICE"),
    (",host=banana", "Property 'vfio-pci.host' doesn't take value 'banana'"),
])
def test_vfio_pci_texts(props, text):
    """hw/vfio/pci.c vfio_realize, and qdev's PCI host address property."""
    with pytest.raises(ValueError) as e:
        parse_options("model", qemu_args=f"-m 1G -device vfio-pci{props}")
    assert str(e.value).endswith(text)


# --- confidential guests ------------------------------------------------------------------------
def test_sev_disables_discard_pins_ram_refuses_virtio_mem_and_migration():
    """target/i386/sev.c sev_kvm_init: ram_block_discard_disable(true) ("SEV/SEV-ES rely on pinned
    memory"); virtio-mem's realize then fails; sev_launch_finish adds the migration blocker."""
    with pytest.raises(ValueError, match="Discarding RAM is disabled$"):
        open_vm(VMEM + " " + SEV)
    vm = open_vm("-m 1G " + SEV + BALLOON)
    assert vm.sample()["host_rss"] == GiB and vm.inspect("host").switches["confidential"] == "SEV"
    churn(vm)
    assert inflate(vm, 512 * MiB)[0] == 0
    with pytest.raises(QMPError, match="^SEV: Migration is not implemented$"):
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    assert parse_options("model", qemu_args="-m 1G " + SEV.replace("bits=1", "bits=1,policy=0x5")
                         ).confidential.kind == "SEV-ES"  # policy bit 2: SEV-ES


@pytest.mark.parametrize("line, kind, blocker", [
    (SNP, "SEV-SNP", "SEV-SNP: Migration is not implemented"),
    (TDX, "TDX", "TDX: migration is not supported (labkit's text; QEMU's is UNCONFIRMED)"),
])
def test_private_memory_guests(line, kind, blocker):
    """SEV-SNP / TDX (QEMU 9.1 / 10.1): every RAM block gets guest_memfd; a discard reaches the shared
    mapping only, so the balloon frees nothing of the private pages; virtio-mem can't be its
    RamDiscardManager ("Failed to set RamDiscardManager", QEMU 10.1); memory is not pinned up front."""
    with pytest.raises(ValueError, match="Failed to set RamDiscardManager$"):
        open_vm(VMEM + " " + line)
    vm = open_vm("-m 1G " + line + BALLOON)
    host = vm.inspect("host")
    assert host.switches["confidential"] == kind and all(b["guest_memfd"] for b in host.blocks)
    assert vm.sample()["host_rss"] < GiB  # faulted in as the guest uses it, not pinned
    churn(vm)
    # nothing freed (init_on_alloc's zeroing of the balloon's pages may even fault some in)
    assert inflate(vm, 512 * MiB)[0] <= 0
    assert vm.inspect("host").private_skipped_pages > 0
    with pytest.raises(QMPError) as e:
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    assert str(e.value) == blocker


def test_confidential_guest_support_must_name_an_object():
    with pytest.raises(ValueError, match="Device 'nope' not found$"):
        parse_options("model", qemu_args="-m 1G -machine confidential-guest-support=nope")


# --- locked memory ------------------------------------------------------------------------------
def test_mem_lock_refuses_virtio_mem_and_fails_every_balloon_discard():
    """virtio_mem_device_realize: "Incompatible with mlock". With mlockall the balloon's
    MADV_DONTNEED fails with EINVAL (mm/madvise.c) and ram_block_discard_range reports each page."""
    with pytest.raises(ValueError, match="Incompatible with mlock$"):
        open_vm(VMEM + " -overcommit mem-lock=on")
    vm = open_vm("-m 1G -overcommit mem-lock=on -device virtio-balloon-pci")
    assert vm.sample()["host_rss"] == GiB
    assert inflate(vm, 1023 * MiB)[0] == 0
    host = vm.inspect("host")
    assert host.qemu_log_lines == 256  # one per 4 KiB balloon page
    assert host.qemu_log[0].startswith("qemu-system-x86_64: ram_block_discard_range: Failed to discard "
                                       "range pc.ram:")
    assert host.qemu_log[0].endswith(" +1000 (-22)")


# --- the balloon's 32-bit page counts -----------------------------------------------------------
def device(ram: int) -> BalloonDevice:
    """QEMU's balloon device alone: its arithmetic needs no guest (a 17 TiB guest is never built)."""
    return BalloonDevice(None, None, None, ram, {"id": "balloon0", "deflate_on_oom": False,
                                                  "free_page_hint": False, "free_page_reporting": False,
                                                  "page_poison": True}, lambda *a: None, lambda: 0.0)


def test_num_pages_is_truncated_to_32_bits():
    """hw/virtio/virtio-balloon.c virtio_balloon_to_target: dev->num_pages = (vm_ram_size - target)
    >> 12, a 64-bit value stored in a uint32_t: a balloon of 2^32 pages (16 TiB, the talk's 2^44)
    becomes 0, one page more becomes 1; no error."""
    d = device(17 * TiB)
    d.to_target(1 * TiB)
    assert d.wanted_pages == 1 << 32 and d.config.num_pages == 0
    d.to_target(1 * TiB - 4096)
    assert d.config.num_pages == 1
    d.to_target(2 * TiB)
    assert d.config.num_pages == (15 * TiB) >> 12  # below 2^32 pages: exact
    assert d.stats["stat-free-memory"] == STAT_UNSET


def test_query_balloon_cannot_show_16_tib_or_more():
    """virtio_balloon_stat: actual = ram_size - ((uint64_t) dev->actual << 12), actual a u32."""
    d = device(17 * TiB)
    d.config.actual = (1 << 32) - 1  # the largest balloon the guest can report
    assert d.logical_actual() == 17 * TiB - ((1 << 44) - 4096)


# --- the live backend's refusals (no QEMU needed) -----------------------------------------------
@pytest.mark.parametrize("line, facts, why", [
    ("-m 512M -device vfio-pci,host=00:1f.0", {}, "vfio-pci needs the host device in an IOMMU group"),
    ("-m 512M " + SEV, {}, "no /dev/sev"),
    ("-m 512M " + SNP, {}, "Parameter 'qom-type' does not accept value 'sev-snp-guest'"),
    ("-m 512M " + TDX, {}, "it came with QEMU 10.1"),
    ("-object memory-backend-memfd,id=m0,size=512M,hugetlb=on,hugetlbsize=2M -machine memory-backend=m0",
     {"hugepages": {2 * MiB: {"total": 100, "free": 100}}}, "needs 256 free 2 MiB huge pages"),
])
def test_live_refuses_what_this_machine_cannot_run(line, facts, why):
    opts = parse_options("qemu", qemu_args=line)
    kw = {"hugepages": {}, "iommu_groups": 0, "dev_sev": False, "qemu_objects": ("sev-guest",)} | facts
    assert why in refusal(opts, **kw)


def test_live_accepts_hugetlbfs_when_the_pool_has_the_pages():
    opts = parse_options("qemu", qemu_args="-object memory-backend-memfd,id=m0,size=512M,hugetlb=on,"
                                           "hugetlbsize=2M -machine memory-backend=m0")
    assert refusal(opts, hugepages={2 * MiB: {"total": 256, "free": 256}}, iommu_groups=0, dev_sev=False,
                   qemu_objects=()) is None
