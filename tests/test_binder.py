"""Binder's files: the pins cover labkit's dependencies, postBuild is valid bash that builds the
guest with private apt lists, and binder/apt_private.py keeps only the main component of the
system's sources (both source formats) so a non-root user can fetch the kernel."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BINDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    pins = {}
    for line in (BINDER / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_every_runtime_dependency_is_pinned():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower().replace("_", "-") for d in deps]
    pins = _pins()
    assert [n for n in names if n not in pins] == []
    assert pins["dask"] == pins["distributed"]  # released together, pinned together
    assert "-e ." in (BINDER / "requirements.txt").read_text()
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"


def test_apt_txt_has_what_the_live_guest_needs():
    packages = (BINDER / "apt.txt").read_text().split()
    # QEMU, the initramfs' userland, the helper's compiler, and zstd for Ubuntu's .ko.zst modules
    assert {"qemu-system-x86", "busybox-static", "gcc", "libc6-dev", "zstd"} <= set(packages)


def test_postbuild_is_bash_and_builds_the_guest_with_private_lists():
    text = (BINDER / "postBuild").read_text()
    assert text.startswith("#!/usr/bin/env bash") and (BINDER / "postBuild").stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(BINDER / "postBuild")]).returncode == 0
    assert 'APT_CONFIG="$conf" labkit guest build' in text and "apt_private.py" in text
    assert "LABKIT_BINDER_STRICT" in text


def test_private_sources_keep_main_only(tmp_path):
    apt_private = _module("apt_private")
    etc = tmp_path / "etc"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "ubuntu.sources").write_text(
        "# Ubuntu 24.04\nTypes: deb deb-src\nURIs: http://archive.ubuntu.com/ubuntu/\n"
        "Suites: noble noble-updates\nComponents: main restricted universe multiverse\n"
        "Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://example.org/other\nSuites: x\nComponents: universe\n\n"
        "Types: deb\nURIs: http://example.org/off\nSuites: y\nComponents: main\nEnabled: no\n")
    (etc / "sources.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] http://deb.debian.org/debian bookworm main contrib\n"
        "deb-src http://deb.debian.org/debian bookworm main\n# deb http://x y main\n")
    text = apt_private.private_sources(etc)
    stanzas = apt_private.deb822_stanzas(text)
    assert [(s["URIs"], s["Suites"], s["Components"]) for s in stanzas] == [
        ("http://archive.ubuntu.com/ubuntu/", "noble noble-updates", "main"),
        ("http://deb.debian.org/debian", "bookworm", "main")]
    assert stanzas[0]["Signed-By"] == "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
    assert stanzas[1]["Signed-By"] == "/k.gpg"
    assert all(s["Types"] == "deb" for s in stanzas)


def test_private_apt_conf_points_every_writable_directory_inside(tmp_path):
    apt_private = _module("apt_private")
    conf = apt_private.setup(tmp_path / "apt").read_text()
    for key in ("Dir::State::Lists", "Dir::Cache", "Dir::Etc::SourceList", "Dir::Etc::SourceParts"):
        assert re.search(rf'{key} "{re.escape(str(tmp_path / "apt"))}', conf), key
    assert 'Debug::NoLocking "true"' in conf


def test_binder_check_knows_repo2dockers_steps():
    check = _module("check")
    steps = ['RUN ${KERNEL_PYTHON_PREFIX}/bin/pip install --no-cache-dir -r "binder/requirements.txt"',
             "RUN chmod +x binder/postBuild", "RUN ./binder/postBuild"]
    assert all(any(re.match(p, s) for p in check.KNOWN_STEPS) for s in steps)
    assert not any(re.match(p, "RUN conda env update -f binder/environment.yml") for p in check.KNOWN_STEPS)
