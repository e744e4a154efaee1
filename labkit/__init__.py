"""labkit: a Jupyter lab and visual explorer of how a hypervisor and its guests share memory.

>>> import labkit
>>> with labkit.open(memory="1G", seed=0) as vm:
...     _ = vm.qmp("balloon", value=768 << 20)
...     vm.advance(1000)
...     vm.qmp("query-balloon")["actual"] == 768 << 20
True
"""

from labkit.backends import Backend, open
from labkit.errors import GuestError, HostOutOfMemory, QMPError

__all__ = ["Backend", "GuestError", "HostOutOfMemory", "QMPError", "open"]
__version__ = "0.1.0"
