"""Issue 12, D5, D6 and item 3: everything labkit writes goes into directories it created privately
or that the user named, and nothing planted in a shared place (a symlink, a traversal name) makes it
touch anything outside.

* An audit of every place in the package that creates, writes, renames or removes a file or a
  directory (an AST scan, so a new one fails this test until it is looked at and listed).
* D5: a kernel whose version string is ``../../../victim`` (or a file ``vmlinuz-..``, or an apt
  package name with a slash) names no directory: the image builder refuses it before it removes or
  replaces anything.
* D6: the pmem demo's backing file is created in a fresh private directory (``mkdtemp``, 0700) with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``: a symlink planted at the old fixed ``/tmp`` name, which
  ``open(path, "wb")`` followed and truncated, is never opened.
* The stale-QEMU sweep of the temp directory only removes this user's own 0700 directories.
* A trace name with a path in it is refused before anything is written.
"""

from __future__ import annotations

import ast
import os
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

import labkit
from labkit.backends.qemu import demos, image, kernel, process
from labkit.model.traces import generate_traces, write_traces

ROOT = Path(__file__).resolve().parent.parent
PRECIOUS = b"precious: must survive\n"

# Every call in labkit that creates, writes, renames or removes a file or directory, by
# "module:function:call", with why it is safe. The scan below fails on any call not listed here.
AUDITED = {
    # the user's own paths (the argument names the file or directory to write)
    "exercises/__init__.py:to_csv:open": "the user's path (marking table CSV)",
    "model/traces.py:write_trace:write_text": "the user's path",
    "model/traces.py:write_traces:mkdir": "the user's directory; trace names are checked",
    "scenarios/base.py:to_json:open": "the user's path",
    "backends/qemu/record.py:save:mkdir": "the user's path, or the project's data/recorded/",
    "backends/qemu/record.py:save:mkstemp": "a temporary name beside the recording (atomic save)",
    "backends/qemu/record.py:save:os.replace": "that temporary file onto the recording's path",
    "backends/qemu/record.py:save:unlink": "that temporary file, when the save failed",
    "exercises/record.py:note:open": "the user's path (labkit grade's checks.jsonl), appended",
    "exercises/record.py:start:write_text": "the user's path (labkit grade's checks.jsonl)",
    "grading/__init__.py:answer_key_csv:write_text": "the user's path (--out)",
    "grading/marks.py:to_csv:open": "the user's path (--out)",
    "grading/report.py:write:open": "the user's path (--report)",
    "regress/report.py:write:mkdir": "the user's report path, or <store>/report.html",
    "regress/report.py:write:write_text": "the user's report path, or <store>/report.html",
    "regress/runner.py:regress:mkdir": "<store>/runs, the user's store (default out/regress)",
    "regress/runner.py:regress:write_text": "<store>/runs/<UTC timestamp>.json, a name labkit makes",
    "scenarios/costs.py:record_resize_speed:write_text": "the user's path, or data/recorded/",
    "cluster.py:stderr_to:open": "a log inside the caller's private temporary directory",
    "backends/vm_commands.py:_socket_path:unlink": "a stale socket of this user's that nobody "
                                                   "listens on (lstat: never a symlink or a file)",
    # labkit's cache, under $XDG_CACHE_HOME/labkit or ~/.cache/labkit (the user's own directory)
    "backends/qemu/accel.py:remember_kvm_failure:mkdir": "cache root",
    "backends/qemu/accel.py:remember_kvm_failure:write_text": "cache root / accel.json",
    "backends/qemu/image.py:build_guest_image:mkdir": "cache/guest (0700)",
    "backends/qemu/image.py:build_guest_image:os.open": "cache/guest/.lock, O_NOFOLLOW",
    "backends/qemu/image.py:build_guest_image:TemporaryDirectory": "private build dir in cache/guest",
    "backends/qemu/image.py:build_guest_image:open": "inside the private build dir",
    "backends/qemu/image.py:build_guest_image:mkdir#2": "inside the private build dir",
    "backends/qemu/image.py:build_guest_image:copyfile": "inside the private build dir",
    "backends/qemu/image.py:build_guest_image:write_bytes": "inside the private build dir",
    "backends/qemu/image.py:build_guest_image:write_text": "inside the private build dir",
    "backends/qemu/image.py:build_guest_image:rmtree": "cache/guest/<validated version>",
    "backends/qemu/image.py:build_guest_image:os.replace": "cache/guest/<validated version>",
    "backends/qemu/image.py:compile_memhold:write_text": "inside the private build dir",
    "backends/qemu/kernel.py:download_kernel:TemporaryDirectory": "private (mkdtemp) download dir",
    "backends/qemu/kernel.py:download_kernel:rmtree": "cache/kernels/<validated package>",
    "backends/qemu/kernel.py:download_kernel:mkdir": "cache/kernels/<validated package>",
    "backends/qemu/kernel.py:download_kernel:write_text": "cache/kernels/<validated package>",
    # private directories labkit made itself (mkdtemp: 0700, a fresh random name)
    "backends/qemu/process.py:__init__:mkdtemp": "QEMU's state directory",
    "backends/qemu/process.py:__init__:open": "scratch disk, inside the state directory",
    "backends/qemu/process.py:__init__:open#2": "QEMU's stderr, inside the state directory",
    "backends/qemu/process.py:__init__:write_text": "owner file, inside the state directory",
    "backends/qemu/process.py:forget_paths:unlink": "sockets, inside the state directory",
    "backends/qemu/process.py:stop:rmtree": "the state directory",
    "backends/qemu/process.py:sweep_stale:rmtree": "this user's own 0700 state directories only",
    "backends/qemu/demos.py:private_file:mkdtemp": "the demo's private directory",
    "backends/qemu/demos.py:private_file:os.open": "O_CREAT|O_EXCL|O_NOFOLLOW in it",
    "backends/qemu/demos.py:_remove_private_dirs:rmtree": "the demo's private directories",
    "scenarios/pmem.py:image_file:TemporaryDirectory": "private scratch directory",
    "scenarios/pmem.py:image_file:open": "inside the private scratch directory",
    "backends/vm_commands.py:_socket_path:mkdtemp": "labkit serve's private socket directory",
    "backends/vm_commands.py:serve_vm:rmtree": "labkit serve's private socket directories",
    "backends/qmp_server.py:serve:unlink": "the socket it bound, if the same inode is still there",
    "grading/execute.py:grade_submission:TemporaryDirectory": "private grading directory",
    "grading/execute.py:grade_submission:mkdir": "--executed directory (the user's), or the "
                                                 "private grading directory",
    "grading/execute.py:grade_submission:mkdir#2": "inside the private grading directory",
    "regress/runner.py:run_point:TemporaryDirectory": "private directory of one grid point",
}
WRITING_CALLS = {"mkdir", "makedirs", "mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile",
                 "write_text", "write_bytes", "rmtree", "unlink", "remove", "rmdir", "rename",
                 "replace", "copyfile", "copy", "copy2", "copytree", "move", "symlink", "touch"}


def _writes(tree: ast.AST, module: str) -> list[str]:
    """Every writing call in ``tree`` as ``module:function:call`` (a repeat gets ``#2``, ...)."""
    found: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            if isinstance(child, ast.Call):
                call = _call_name(child)
                if call is not None:
                    key = f"{module}:{function}:{call}"
                    n = sum(1 for f in found if f.split("#")[0] == key)
                    found.append(key if n == 0 else f"{key}#{n + 1}")
            visit(child, name)

    visit(tree, "<module>")
    return found


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    attr = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
    if attr == "open" and owner == "os":  # creates or truncates only with these flags
        flags = {n.attr for n in ast.walk(call.args[1]) if isinstance(n, ast.Attribute)} if len(
            call.args) > 1 else set()
        return "os.open" if flags & {"O_CREAT", "O_TRUNC"} else None
    if attr == "replace" and owner == "os":
        return "os.replace"
    if attr == "open" and owner in ("", "io"):
        mode = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "mode"), None)
        text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"
        return "open" if set(text) & set("wax+") else None
    if attr in ("replace", "remove", "copy", "move", "touch"):  # str.replace, list.remove...: only
        return attr if owner in ("os", "shutil") else None   # the os / shutil ones write files
    return attr if attr in WRITING_CALLS else None


def test_every_place_labkit_writes_files_is_audited():
    found = {}
    for path in sorted((ROOT / "labkit").rglob("*.py")):
        module = path.relative_to(ROOT / "labkit").as_posix()
        for key in _writes(ast.parse(path.read_text()), module):
            found[key] = module
    new = sorted(set(found) - set(AUDITED))
    gone = sorted(set(AUDITED) - set(found))
    assert not new, f"labkit writes files in places nobody checked: {new}; make them safe, then list them"
    assert not gone, f"listed but no longer in the code (update AUDITED): {gone}"


# --- D5: the guest image builder and kernel names ------------------------------------------------
def _fake_bzimage(path: Path, version: bytes) -> Path:
    """A file with a bzImage setup header (``HdrS``) whose kernel_version string is ``version``."""
    head = bytearray(0x4000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x1000 - 0x200).to_bytes(2, "little")
    head[0x1000:0x1000 + len(version)] = version
    path.write_bytes(bytes(head))
    return path


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "x" / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_bytes(PRECIOUS)
    return victim


@pytest.mark.parametrize("version", [b"../../../victim 1 SMP", b"/abs/victim", b".. x", b"a/../../b"])
def test_a_kernel_version_with_a_path_in_it_is_refused_before_anything_is_written(tmp_path, version):
    victim = _victim(tmp_path)
    cache = tmp_path / "x" / "y" / "cache"  # cache/guest/../../../victim is tmp/x/victim
    vmlinuz = _fake_bzimage(tmp_path / "vmlinuz-evil", version)
    with pytest.raises(kernel.KernelNotFound, match="cannot name a directory"):
        image.build_guest_image(vmlinuz, cache_dir=cache, download=False)
    assert (victim / "keep.txt").read_bytes() == PRECIOUS
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not cache.exists()  # refused before anything was created


def test_a_vmlinuz_named_dot_dot_is_refused(tmp_path):
    """No setup header: the version comes from the file name, ``vmlinuz-..`` -> ``..``."""
    bad = tmp_path / "vmlinuz-.."
    bad.write_bytes(b"not a bzImage")
    with pytest.raises(kernel.KernelNotFound, match=r"'\.\.' cannot name a directory"):
        kernel.find_kernel(bad)


def test_an_apt_package_name_with_a_slash_is_refused(tmp_path, monkeypatch):
    victim = _victim(tmp_path)
    cache = tmp_path / "x" / "y" / "cache"
    monkeypatch.setattr(kernel.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(kernel, "_depends", lambda package: ["linux-image-1/../../../../victim"])
    monkeypatch.setenv("LABKIT_KERNEL_PACKAGE", "linux-image-cloud-amd64")
    monkeypatch.setattr(kernel, "_apt", lambda *a, **k: pytest.fail(f"apt ran: {a}"))
    with pytest.raises(kernel.KernelNotFound, match="apt package .* cannot name a directory"):
        kernel.download_kernel(cache)
    assert (victim / "keep.txt").read_bytes() == PRECIOUS and not cache.exists()


def test_under_resolves_dot_dot_lexically(tmp_path):
    assert kernel.under(tmp_path, tmp_path / "guest" / "6.1") == tmp_path / "guest" / "6.1"
    for outside in (tmp_path / ".." / "x", tmp_path / "a" / ".." / "..", tmp_path):
        with pytest.raises(ValueError, match="is not inside"):
            kernel.under(tmp_path, outside)


# --- D6: the pmem demo's file ---------------------------------------------------------------------
def test_the_pmem_demo_never_opens_a_planted_symlink(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the shared temp directory
    victim = tmp_path / "victim.img"
    victim.write_bytes(PRECIOUS)
    for planted in ("labkit-demo-pmem.img", "pmem.img", "labkit-demo-"):
        (tmp_path / planted).symlink_to(victim)
    paths = []
    for _ in range(2):
        options = demos.model_options("pmem")
        path = Path(options["virtio_pmem"][0]["path"])
        paths.append(path)
        st = os.lstat(path.parent)
        assert path.parent.parent == tmp_path and stat.S_IMODE(st.st_mode) == 0o700
        assert stat.S_ISREG(os.lstat(path).st_mode) and path.stat().st_size == 256 << 20
        with labkit.open(**options) as vm:  # the model opens the file it was given
            assert vm.guest("pmem_devices")[0]["size"] == 256 << 20
    assert paths[0].parent != paths[1].parent  # a fresh private directory each time
    assert victim.read_bytes() == PRECIOUS
    demos._remove_private_dirs()
    assert not any(p.parent.exists() for p in paths)
    assert victim.read_bytes() == PRECIOUS


def test_private_file_refuses_to_follow_or_reuse(tmp_path, monkeypatch):
    """O_EXCL | O_NOFOLLOW: even inside its own directory the file is created, never reopened."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": str(tmp_path / "fixed"))
    (tmp_path / "fixed").mkdir()
    (tmp_path / "fixed" / "pmem.img").symlink_to(tmp_path / "victim.img")
    (tmp_path / "victim.img").write_bytes(PRECIOUS)
    with pytest.raises(FileExistsError):
        demos.private_file("pmem.img", 1 << 20)
    assert (tmp_path / "victim.img").read_bytes() == PRECIOUS
    demos._PRIVATE_DIRS.clear()


# --- the stale-QEMU sweep ---------------------------------------------------------------------------
def test_the_stale_sweep_removes_only_this_users_private_directories(tmp_path):
    victim = _victim(tmp_path)
    prefix = process.STATE_DIR_PREFIX
    (tmp_path / f"{prefix}link").symlink_to(victim)  # a planted symlink with the prefix
    shared = tmp_path / f"{prefix}shared"  # someone's directory, not private
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "owner").write_text("999999 999999\n")
    stale = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_path))  # ours, its owner long gone
    (stale / "owner").write_text("999999 999999\n")
    removed = process.sweep_stale(str(tmp_path))
    assert removed == [str(stale)] and not stale.exists()
    assert (tmp_path / f"{prefix}link").is_symlink() and shared.is_dir()
    assert (victim / "keep.txt").read_bytes() == PRECIOUS


# --- traces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape", "/abs", "..", ".hidden", "a/b", ""])
def test_a_trace_name_with_a_path_is_refused_before_anything_is_written(tmp_path, name):
    trace = replace(generate_traces(n_vms=1, hours=1, seed=0)[0], name=name)
    out = tmp_path / "out" / "traces"
    with pytest.raises(ValueError, match="cannot name a file"):
        write_traces([trace], out)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
