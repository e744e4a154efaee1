"""What labkit writes from backends/ (issue 12, item 3): ``labkit serve``'s QMP and HMP sockets and
the recordings go into a private directory labkit made (mkdtemp, mode 0700) or to a path the user
named, and nothing planted at that path (a symlink, dangling or not, a file, someone's socket, a
live server's socket) is followed, replaced or removed. The live backend's QEMU state directory is
a mkdtemp directory too (labkit.backends.qemu.process.QemuProcess).

Each test plants something and shows it is left as it was; the CLI refuses with one line, never a
traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest

import labkit
from labkit.backends import vm_commands
from labkit.backends.qemu.record import Recorder
from labkit.backends.qmp_server import QmpServer
from labkit.cli import main

PRECIOUS = b"precious: must survive\n"


def in_thread(function, *args):
    """Run ``function`` on a thread of its own (asyncio.run needs a thread without a running loop:
    the browser tests' Playwright keeps one on the main thread) and return what it returns."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result(timeout=120)


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(PRECIOUS)
    return path


def serve(argv: list[str], capsys) -> tuple[int, str]:
    code = in_thread(main, ["serve", *argv, "--", "-m", "256M"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("planted", ["symlink", "dangling", "file", "directory"])
def test_serve_refuses_a_planted_path_and_leaves_it_alone(planted, tmp_path, victim, capsys):
    path = tmp_path / "qmp.sock"
    if planted == "symlink":
        path.symlink_to(victim)
    elif planted == "dangling":
        path.symlink_to(tmp_path / "nowhere" / "x.sock")
    elif planted == "file":
        path.write_bytes(PRECIOUS)
    else:
        path.mkdir()
    code, err = serve(["--qmp", f"unix:{path}"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    expected = "is a symlink" if planted in ("symlink", "dangling") else "exists and is not a socket"
    assert err.startswith(f"labkit serve: error: --qmp {path} {expected}")
    assert victim.read_bytes() == PRECIOUS
    if planted == "symlink":
        assert path.is_symlink() and path.resolve() == victim
    elif planted == "dangling":
        assert path.is_symlink() and not (tmp_path / "nowhere").exists()
    elif planted == "file":
        assert path.read_bytes() == PRECIOUS
    else:
        assert path.is_dir()


def test_serve_refuses_another_users_socket(tmp_path, capsys, monkeypatch):
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    monkeypatch.setattr(vm_commands.os, "getuid", lambda: os.stat(path).st_uid + 1)
    code, err = serve(["--qmp", f"unix:{path}"], capsys)
    assert code == 1 and "is a socket of another user" in err
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_serve_refuses_a_socket_a_server_still_listens_on(tmp_path, capsys):
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        code, err = serve(["--qmp", f"unix:{path}"], capsys)
        assert code == 1 and "a server is listening on this socket" in err
        with socket.socket(socket.AF_UNIX) as client:  # still the other server's
            client.connect(str(path))


def test_serve_cannot_listen_where_there_is_no_directory(tmp_path, capsys):
    code, err = serve(["--qmp", f"unix:{tmp_path}/missing/qmp.sock"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "cannot listen on unix:" in err and "No such file or directory" in err


def test_a_stale_socket_of_ours_is_replaced_and_removed_at_exit(tmp_path):
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # nobody listens on it any more
    assert vm_commands._socket_path(f"unix:{path}", [], "qmp") == str(path)
    assert not path.exists()  # the stale name is gone; the server binds a fresh socket

    async def run():
        server = QmpServer(labkit.open(memory="256M", seed=0), speed=1.0)
        task = asyncio.create_task(server.serve(str(path)))
        while not path.exists():
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_unix_connection(str(path))  # a live socket now
        assert b'"QMP"' in await reader.readline()
        writer.close()
        server.stop()
        await task

    in_thread(asyncio.run, run())
    assert not path.exists()


def test_at_exit_the_server_removes_only_the_socket_it_made(tmp_path, victim):
    """Something put at the socket's path while it served (the socket replaced by a symlink to
    the victim) is left alone when the server stops."""
    path = tmp_path / "qmp.sock"

    async def run():
        server = QmpServer(labkit.open(memory="256M", seed=0), speed=1.0)
        task = asyncio.create_task(server.serve(str(path)))
        while not path.exists():
            await asyncio.sleep(0.01)
        path.unlink()
        path.symlink_to(victim)
        server.stop()
        await task

    in_thread(asyncio.run, run())
    assert path.is_symlink() and victim.read_bytes() == PRECIOUS


def test_unix_alone_makes_a_private_directory_and_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "labkit-serve-").symlink_to(tmp_path)  # a planted name near mkdtemp's
    private: list[str] = []
    path = vm_commands._socket_path("unix:", private, "qmp")
    hmp = vm_commands._socket_path("unix:", private, "hmp")
    directory = Path(private[0])
    assert Path(path).parent == directory == Path(hmp).parent and len(private) == 1
    st = os.lstat(directory)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert directory.parent == tmp_path and directory.name.startswith("labkit-serve-")


def test_serve_end_to_end_in_a_private_directory_leaves_nothing(tmp_path, monkeypatch, capsys):
    """``labkit serve --qmp unix:`` prints its private socket, serves, and removes the directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def stop_soon(self, qmp_path, hmp_path=None):
        async def body():
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, self.stop)
            await original(self, qmp_path, hmp_path)
        return body()

    original = QmpServer.serve
    monkeypatch.setattr(QmpServer, "serve", stop_soon)
    assert in_thread(main, ["serve", "--qmp", "unix:", "--hmp", "unix:", "--", "-m", "256M"]) == 0
    out = capsys.readouterr().out
    assert f"QMP on unix:{tmp_path}/labkit-serve-" in out
    assert list(tmp_path.iterdir()) == []


# --- recordings ------------------------------------------------------------------------------------
def test_a_recording_replaces_a_planted_symlink_and_never_writes_through_it(tmp_path, victim):
    path = tmp_path / "run.json"
    path.symlink_to(victim)
    with Recorder(labkit.open(memory="256M", seed=0)) as vm:
        vm.advance(10)
        vm.save(path)
    assert victim.read_bytes() == PRECIOUS
    assert not path.is_symlink() and path.read_text().startswith("{")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "victim"]  # no temp file left
