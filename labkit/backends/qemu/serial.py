"""The guest's serial console as a command channel: framed commands, timeouts, a dead-guest check.

The guest runs a non-interactive shell on ``ttyS0`` with echo off (see
:mod:`labkit.backends.qemu.guestfiles`). Each command is sent as::

    printf '@@B%s@@\\n' TOKEN; { COMMAND
    } </dev/null 2>&1; printf '\\n@@E%s:%d@@\\n' TOKEN $?

and its output is what lies between ``@@B<TOKEN>@@`` and ``@@E<TOKEN>:<status>@@``. The markers are
built by ``printf`` in the guest, so the command text itself never contains them (even if the tty did
echo), and each token is unique, so a late answer to a timed-out command can't be taken for the answer
to the next one.

>>> text = "noise\\r\\n@@Bt1@@\\r\\nhello\\nworld\\n\\n@@Et1:0@@\\r\\nrest"
>>> parse_framed(text, "t1")
('hello\\nworld\\n', 0, 'rest')
>>> parse_framed("@@Bt2@@\\npartial", "t2") is None
True
"""

from __future__ import annotations

import collections
import itertools
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable

from labkit.errors import GuestError

TRANSCRIPT_CHARS = 64_000  # what is kept of the console for error messages
DEFAULT_TIMEOUT_S = 30.0


class GuestTimeout(GuestError):
    """A guest command did not finish in time (the guest may be busy, hung or out of memory)."""


class GuestDied(GuestError):
    """The serial console closed: QEMU exited or the guest shell is gone."""


def frame(token: str, command: str) -> str:
    """The line(s) sent for ``command``; ``command`` may end with ``&`` or span lines."""
    return (f"printf '@@B%s@@\\n' {token}; {{ {command}\n}} </dev/null 2>&1; "
            f"printf '\\n@@E%s:%d@@\\n' {token} $?\n")


def parse_framed(buffer: str, token: str) -> tuple[str, int, str] | None:
    """``(output, exit status, rest of buffer)`` once both markers of ``token`` are in ``buffer``,
    else ``None``. Carriage returns are dropped; the newline printed before the end marker is not
    part of the output."""
    text = buffer.replace("\r", "")
    begin = text.find(f"@@B{token}@@\n")
    if begin < 0:
        return None
    match = re.compile(rf"\n@@E{re.escape(token)}:(\d+)@@\n?").search(text, begin)
    if match is None:
        return None
    output = text[begin + len(f"@@B{token}@@\n"): match.start()]
    return output, int(match.group(1)), text[match.end():]


class SerialShell:
    """Commands over a connected unix socket to QEMU's serial chardev.

    A reader thread appends everything the guest prints to a buffer (and a bounded transcript);
    :meth:`run` sends one framed command and waits for its markers. ``alive`` is a callable that says
    whether QEMU still runs, so a dead guest is reported at once instead of after the timeout.
    """

    def __init__(self, sock: socket.socket, alive: Callable[[], bool] | None = None):
        self.sock = sock
        self.alive = alive or (lambda: True)
        self._buffer = ""
        self.transcript: collections.deque[str] = collections.deque()
        self._transcript_len = 0
        self._cond = threading.Condition()
        self._eof = False
        self._lock = threading.Lock()  # one command at a time
        self._ids = itertools.count(1)
        self._salt = secrets.token_hex(3)
        self._reader = threading.Thread(target=self._read, name="labkit-serial", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            text = chunk.decode("utf-8", errors="replace")
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buffer += text
                self.transcript.append(text)
                self._transcript_len += len(text)
                while self._transcript_len > TRANSCRIPT_CHARS and len(self.transcript) > 1:
                    self._transcript_len -= len(self.transcript.popleft())
                self._cond.notify_all()

    def tail(self, chars: int = 2000) -> str:
        """The last ``chars`` characters the guest printed."""
        with self._cond:
            return "".join(self.transcript)[-chars:]

    def wait_for(self, marker: str, timeout: float) -> str:
        """Wait until ``marker`` appears in the output; return the output up to and including it
        (it and what came before are consumed). Raises GuestDied / GuestTimeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                at = self._buffer.find(marker)
                if at >= 0:
                    end = self._buffer.find("\n", at)
                    end = len(self._buffer) if end < 0 else end + 1
                    seen, self._buffer = self._buffer[:end], self._buffer[end:]
                    return seen
                self._check(deadline, f"waiting for {marker!r}")
                self._cond.wait(0.1)

    def _check(self, deadline: float, what: str) -> None:
        if self._eof or not self.alive():
            raise GuestDied(f"the guest's serial console closed while {what}; last output:\n"
                            f"{self.tail(1500)}")
        if time.monotonic() > deadline:
            raise GuestTimeout(f"no answer from the guest after {what}; last output:\n{self.tail(800)}")

    def run(self, command: str, timeout: float = DEFAULT_TIMEOUT_S, check: bool = True) -> tuple[str, int]:
        """Run ``command`` in the guest shell; return ``(output, exit status)``.

        ``check=True`` raises :class:`labkit.GuestError` (with the output) on a non-zero status."""
        with self._lock:
            token = f"{self._salt}{next(self._ids):x}"
            try:
                self.sock.sendall(frame(token, command).encode())
            except OSError as e:
                raise GuestDied(f"cannot write to the guest's serial console: {e}") from None
            deadline = time.monotonic() + timeout
            with self._cond:
                while True:
                    parsed = parse_framed(self._buffer, token)
                    if parsed is not None:
                        output, status, self._buffer = parsed
                        break
                    self._check(deadline, f"{timeout:g} s running {command[:200]!r}")
                    self._cond.wait(0.1)
        if check and status != 0:
            raise GuestError(f"guest command {command[:200]!r} failed with status {status}: "
                             f"{output.strip()[-800:]}")
        return output, status

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(2.0)
