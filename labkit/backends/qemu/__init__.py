"""The live backend: a real Linux guest under QEMU, behind the same methods as the model.

* :mod:`~labkit.backends.qemu.kernel` and :mod:`~labkit.backends.qemu.image` find a kernel and build
  (and cache) a busybox initramfs with the virtio modules: :func:`build_guest_image`.
* :mod:`~labkit.backends.qemu.process`: QEMU's command line and process (KVM or TCG, private sockets).
* :mod:`~labkit.backends.qemu.qmp`: ``qemu.qmp`` on its own loop and thread (works inside Jupyter).
* :mod:`~labkit.backends.qemu.serial` and :mod:`~labkit.backends.qemu.guest`: framed shell commands
  over a virtio-serial port, and the workload steps of ``guest(op)``.
* :mod:`~labkit.backends.qemu.pvh`: the uncompressed kernel, booted at its PVH entry (~0.5 s sooner).
* :mod:`~labkit.backends.qemu.hostmem`: QEMU's guest-RAM RSS from ``/proc/<pid>/smaps``, and the
  host side of a virtio-pmem file (its mapping's dirty pages, its pages in the page cache).
* :mod:`~labkit.backends.qemu.pmem`: virtio-pmem devices and the ``pmem_*`` guest ops.
* :mod:`~labkit.backends.qemu.backend`: :class:`QemuBackend` and :func:`open_qemu`.
* :mod:`~labkit.backends.qemu.record`: save a live run as JSON, and replay it without QEMU.

>>> from labkit.backends.qemu import open_qemu
>>> with open_qemu(memory="512M") as vm:  # doctest: +SKIP
...     vm.qmp("query-balloon")
{'actual': 536870912}
"""

from labkit.backends.qemu.backend import QemuBackend, QemuError, open_qemu
from labkit.backends.qemu.image import GuestImage, build_guest_image, cache_root
from labkit.backends.qemu.kernel import KernelNotFound
from labkit.backends.qemu.serial import GuestDied, GuestTimeout

__all__ = ["GuestDied", "GuestImage", "GuestTimeout", "KernelNotFound", "QemuBackend", "QemuError",
           "build_guest_image", "cache_root", "open_qemu"]
