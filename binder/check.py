"""``make binder-check``: build what Binder builds from binder/, on this machine and without docker,
then run every notebook in it (notebook 07 on a live guest).

repo2docker turns binder/ into a Dockerfile; this reads that Dockerfile (``repo2docker --no-build
--debug --no-run``, from a scratch venv with jupyter-repo2docker) and fails if it holds a step this
script does not reproduce. The steps, in repo2docker's order:

1. ``apt-get install`` of binder/apt.txt, as root (here: only what is missing; the lists are kept);
2. the repository copied to REPO_DIR = the user's HOME, owned by the user (uid 1000 on Binder;
   here ``nobody``, or $BINDER_CHECK_USER, when run as root; yourself otherwise);
3. as that user, a fresh Python 3.11 environment holding repo2docker's base packages (its conda
   environment's top-level pins, from PyPI), then ``pip install --no-cache-dir -r
   binder/requirements.txt``; ``pip check`` must be clean;
4. as that user, ``./binder/postBuild`` (with LABKIT_BINDER_STRICT=1: the live guest must build);
5. as that user, every notebook under notebooks/ executed with papermill in that environment
   (notebook 07 with MODE="live": it must boot QEMU, under TCG as on Binder), with a HOME and
   apt lists of its own: nothing of this machine's user caches is used.

What it cannot reproduce: Binder's conda-forge Python (a venv of this machine's python3.11 stands in
for it), the Ubuntu 24.04 base image (apt.txt's packages are this machine's Debian ones), and the
pod's ~2 GiB memory limit. It prints the time of each step.

    python binder/check.py [--keep] [--skip-notebooks]      (BINDER_CHECK_DIR=... to reuse a folder)
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = "3.11"
NOTEBOOK_CELL_TIMEOUT_S = 1200
# conda package -> PyPI name, for repo2docker's base environment (None: not a Python package)
CONDA_TO_PIP = {"python": None, "nodejs": None, "pip": None, "jupyterhub-singleuser": "jupyterhub"}
# the Dockerfile lines this script reproduces, in order (after the repository is copied)
KNOWN_STEPS = (
    r'^RUN \$\{KERNEL_PYTHON_PREFIX\}/bin/pip install --no-cache-dir -r "binder/requirements.txt"$',
    r"^RUN chmod \+x binder/postBuild$",
    r"^RUN \./binder/postBuild$",
)
timings: list[tuple[str, float]] = []


def step(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== binder-check: {name}", flush=True)
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                timings.append((name, time.monotonic() - start))
                print(f"--- {name}: {time.monotonic() - start:.0f} s", flush=True)
        return run
    return wrap


def fail(message: str) -> None:
    raise SystemExit(f"binder-check: FAILED: {message}")


class User:
    """Who runs the build steps: ``nobody`` (or $BINDER_CHECK_USER) under root, else ourselves."""

    def __init__(self, home: Path):
        if os.geteuid() == 0:
            entry = pwd.getpwnam(os.environ.get("BINDER_CHECK_USER", "nobody"))
        else:
            entry = pwd.getpwuid(os.geteuid())
        if entry.pw_uid == 0:
            fail("BINDER_CHECK_USER must not be root: Binder builds as a normal user")
        self.name, self.uid, self.gid, self.home = entry.pw_name, entry.pw_uid, entry.pw_gid, home

    def chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)

    def run(self, cmd: list[str], env: dict, cwd: Path, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *cmd]
        print("$", " ".join(cmd[-6:] if len(cmd) > 6 else cmd), flush=True)
        done = subprocess.run(cmd, env=env, cwd=cwd, **kw)
        if check and done.returncode != 0:
            fail(f"{' '.join(cmd)} exited {done.returncode}")
        return done


def find_python() -> str:
    homes = (os.path.expanduser("~root") + "/", str(Path.home()))  # not runnable by the build user
    for name in (f"/usr/bin/python{PYTHON}", f"/usr/local/bin/python{PYTHON}",
                 shutil.which(f"python{PYTHON}")):
        if name and os.access(name, os.X_OK) and not name.startswith(homes):
            return name
    fail(f"no python{PYTHON} that a normal user can run (apt-get install python{PYTHON}-venv)")
    return ""


@step("repo2docker's Dockerfile")
def dockerfile(work: Path, user: User) -> dict:
    r2d = work / "r2d"
    if not (r2d / "bin" / "repo2docker").exists():
        subprocess.run([sys.executable, "-m", "venv", str(r2d)], check=True)
        subprocess.run([str(r2d / "bin" / "pip"), "install", "-q", "jupyter-repo2docker"], check=True)
    out = subprocess.run([str(r2d / "bin" / "repo2docker"), "--no-build", "--debug", "--no-run",
                          "--user-id", "1000", "--user-name", "jovyan", str(REPO)],
                         capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    (work / "Dockerfile.txt").write_text(text)
    if out.returncode != 0:
        fail(f"repo2docker --no-build exited {out.returncode}; see {work / 'Dockerfile.txt'}")
    if f"python={PYTHON}" not in text:
        fail(f"repo2docker does not build Python {PYTHON} (binder/runtime.txt?)")
    if "buildpack-deps:24.04" not in text:
        print("binder-check: note: repo2docker's base image is no longer Ubuntu 24.04")
    after = text.split("COPY --chown=1000:1000 src/binder/requirements.txt")[-1]
    apt = re.search(r"apt-get install --yes --no-install-recommends ([^&\\]+)", after)
    wanted = sorted((REPO / "binder" / "apt.txt").read_text().split())
    if not apt or sorted(apt.group(1).split()) != wanted:
        fail(f"repo2docker installs {apt.group(1).split() if apt else 'no apt packages'}, "
             f"apt.txt lists {wanted}")
    tail = text.split("COPY --chown=1000:1000 src/ ${REPO_DIR}/")[-1]
    runs = [line.strip() for line in tail.splitlines() if line.startswith("RUN ")]
    unknown = [r for r in runs if not any(re.match(p, r) for p in KNOWN_STEPS)]
    if unknown:
        fail(f"repo2docker has steps this check does not reproduce: {unknown}")
    version = subprocess.run([str(r2d / "bin" / "repo2docker"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    print(f"repo2docker {version}: apt {wanted}; then as the user: {runs}")
    conda = next((r2d / "lib").glob("python*/site-packages/repo2docker/buildpacks/conda"))
    lock = conda / f"environment.py-{PYTHON}-linux-64.lock"
    spec = lock.with_name(f"environment.py-{PYTHON}.yml").read_text()
    names = re.findall(r"^\s*-\s*([A-Za-z0-9_.-]+)", spec, flags=re.M)
    base = []
    for name in names:
        pip_name = CONDA_TO_PIP.get(name, name)
        version = re.search(rf"/{re.escape(name)}-(\d[^-/]*)-[^/]*\.(?:conda|tar\.bz2)", lock.read_text())
        if pip_name and version:
            base.append(f"{pip_name}=={version.group(1)}")
    print("repo2docker's base environment (from PyPI here):", " ".join(base))
    return {"base": base, "apt": wanted}


@step("apt.txt")
def apt(packages: list[str]) -> None:
    missing = [p for p in packages if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
    ).stdout != "install ok installed"]
    if not missing:
        print("installed already:", " ".join(packages))
        return
    if os.geteuid() != 0:
        fail(f"apt.txt packages missing: {missing}; as root: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "-qq", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "--yes", "--no-install-recommends", *missing], check=True, env=env)


@step("repository into REPO_DIR=$HOME")
def copy_repo(user: User) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    (user.home / ".tmp").mkdir(exist_ok=True)
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            dst = user.home / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    user.chown(user.home)
    print(f"{len([f for f in files if f])} files, owned by {user.name}")


def user_env(user: User, prefix: Path) -> dict:
    keep = {k: v for k, v in os.environ.items()
            if k.startswith(("PIP_", "LC_", "LANG")) or k.lower().endswith("_proxy") or k == "TERM"}
    return {**keep, "HOME": str(user.home), "USER": user.name, "REPO_DIR": str(user.home),
            "PATH": f"{user.home}/.local/bin:{prefix}/bin:/usr/local/bin:/usr/bin:/bin",
            "SHELL": "/bin/bash", "BOKEH_RESOURCES": "inline", "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(user.home / ".tmp")}  # a container's /tmp is its own, not this machine's


@step("Python 3.11 environment from binder/requirements.txt")
def environment(user: User, prefix: Path, base: list[str]) -> None:
    env = user_env(user, prefix)
    user.run([find_python(), "-m", "venv", str(prefix)], env, user.home)
    pip = [str(prefix / "bin" / "pip"), "install", "--no-cache-dir", "-q", "--disable-pip-version-check"]
    user.run(pip + base, env, user.home)
    user.run(pip + ["-r", "binder/requirements.txt"], env, user.home)
    user.run([str(prefix / "bin" / "pip"), "check"], env, user.home)
    probe = "import sys, labkit; print(sys.version.split()[0], labkit.__file__)"
    version = user.run([str(prefix / "bin" / "python"), "-c", probe], env, user.home,
                       capture_output=True, text=True).stdout.strip()
    print("python, labkit:", version)
    if not version.startswith(PYTHON) or str(user.home) not in version:
        fail(f"the environment runs {version}, not Python {PYTHON} with labkit from REPO_DIR")


@step("postBuild")
def post_build(user: User, prefix: Path) -> None:
    env = {**user_env(user, prefix), "LABKIT_BINDER_STRICT": "1"}
    user.run(["bash", "-c", "chmod +x binder/postBuild && ./binder/postBuild"], env, user.home)
    guests = sorted((user.home / ".cache" / "labkit" / "guest").glob("*"))
    if not guests:
        fail("postBuild built no guest image under ~/.cache/labkit/guest")
    print("guest image:", ", ".join(g.name for g in guests))


RUNNER = r'''
import glob, os, sys, tempfile, time, papermill
failed = []
for path in sorted(glob.glob("notebooks/**/*.ipynb", recursive=True)):
    if ".ipynb_checkpoints" in path:
        continue
    params = {"MODE": "live"} if path.endswith("07_live_qemu.ipynb") else {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            papermill.execute_notebook(path, os.path.join(tmp, "out.ipynb"), parameters=params,
                                       kernel_name="python3", cwd=tmp, progress_bar=False,
                                       execution_timeout=TIMEOUT)
            status = "ok"
        except Exception as e:
            status = "FAILED: " + (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            failed.append(path)
    print(f"{time.monotonic() - start:7.1f} s  {path}  {status}" + (" (live)" if params else ""), flush=True)
sys.exit(1 if failed else 0)
'''.replace("TIMEOUT", str(NOTEBOOK_CELL_TIMEOUT_S))


@step("every notebook, 07 live")
def notebooks(user: User, prefix: Path) -> None:
    env = user_env(user, prefix)
    script = user.home / ".binder-check-notebooks.py"
    script.write_text(RUNNER)
    user.chown(script)
    done = user.run([str(prefix / "bin" / "python"), str(script)], env, user.home, check=False)
    if done.returncode != 0:
        fail("a notebook failed in the Binder environment (see above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--skip-notebooks", action="store_true", help="stop after postBuild")
    args = parser.parse_args(argv)
    start = time.monotonic()
    work = Path(os.environ.get("BINDER_CHECK_DIR") or tempfile.mkdtemp(prefix="labkit-binder-check-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    home = work / "home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir()
    user = User(home)
    prefix = work / "srv" / "notebook"  # repo2docker's NB_PYTHON_PREFIX, owned by the user
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.mkdir(parents=True)
    user.chown(work / "srv")
    print(f"binder-check: work folder {work}, building as {user.name} (uid {user.uid})")
    ok = False
    try:
        spec = dockerfile(work, user)
        apt(spec["apt"])
        copy_repo(user)
        environment(user, prefix, spec["base"])
        post_build(user, prefix)
        if not args.skip_notebooks:
            notebooks(user, prefix)
        ok = True
    finally:
        print("\nbinder-check timings:")
        for name, seconds in timings:
            print(f"  {seconds:7.0f} s  {name}")
        print(f"  {time.monotonic() - start:7.0f} s  total ({'passed' if ok else 'FAILED'})")
        if not args.keep and ok and not os.environ.get("BINDER_CHECK_DIR"):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
