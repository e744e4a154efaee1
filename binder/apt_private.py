"""Private apt package lists for a user who is not root (run by binder/postBuild).

repo2docker installs binder/apt.txt as root and then deletes /var/lib/apt/lists, and postBuild runs
as the notebook user: apt cannot read the system's lists and cannot write them. apt works without
root when every directory it writes is the user's own. This writes DIR/apt.conf (lists, caches and
sources under DIR; no locking) and DIR/sources.list.d/ (the system's own sources, the ``main``
component only: the kernel lives there on Debian and Ubuntu, and it keeps the download to a few
MB), then runs ``apt-get update`` with it. Use it as ``APT_CONFIG=DIR/apt.conf apt-get download ...``:
labkit's kernel fetch (labkit/backends/qemu/kernel.py) passes its environment on to apt.

    python binder/apt_private.py DIR
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

COMPONENTS = ("main",)


def deb822_stanzas(text: str) -> list[dict[str, str]]:
    """The stanzas of a deb822 ``.sources`` file (comments dropped, continuation lines joined)."""
    stanzas, current, key = [], {}, None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            current[key] = value.strip()
    return stanzas


def private_sources(etc: Path = Path("/etc/apt")) -> str:
    """The system's binary sources, as one deb822 file keeping only :data:`COMPONENTS`."""
    out = []
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for s in deb822_stanzas(path.read_text(errors="replace")):
            if s.get("Enabled", "yes").lower() == "no" or "deb" not in s.get("Types", "").split():
                continue
            comps = [c for c in s.get("Components", "").split() if c in COMPONENTS]
            if not comps or not s.get("URIs") or not s.get("Suites"):
                continue
            lines = ["Types: deb", f"URIs: {s['URIs']}", f"Suites: {s['Suites']}",
                     f"Components: {' '.join(comps)}"]
            if s.get("Signed-By"):
                lines.append("Signed-By: " + s["Signed-By"].replace("\n", "\n "))
            out.append("\n".join(lines))
    one_line = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
            if not m:
                continue
            comps = [c for c in m.group(4).split() if c in COMPONENTS]
            if not comps:
                continue
            entry = ["Types: deb", f"URIs: {m.group(2)}", f"Suites: {m.group(3)}",
                     f"Components: {' '.join(comps)}"]
            signed = re.search(r"signed-by=(\S+?)[\s\]]", m.group(1) or "")
            if signed:
                entry.append(f"Signed-By: {signed.group(1)}")
            out.append("\n".join(entry))
    return "\n\n".join(out) + "\n"


def setup(directory: Path) -> Path:
    """Write the private configuration under ``directory``; returns the apt.conf path."""
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    sources = private_sources()
    if not sources.strip():
        raise SystemExit("apt_private: no 'deb ... main' source in /etc/apt: cannot fetch the kernel")
    (directory / "sources.list.d" / "labkit.sources").write_text(sources)
    (directory / "sources.list").write_text("")
    conf = directory / "apt.conf"
    conf.write_text("\n".join([
        f'Dir::State::Lists "{directory}/lists";',
        f'Dir::Cache "{directory}/cache";',
        f'Dir::Etc::SourceList "{directory}/sources.list";',
        f'Dir::Etc::SourceParts "{directory}/sources.list.d";',
        'Debug::NoLocking "true";',
        'Acquire::Languages "none";',
    ]) + "\n")
    return conf


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    conf = setup(Path(argv[0]).resolve())
    done = subprocess.run(["apt-get", "-q", "update"], env={**os.environ, "APT_CONFIG": str(conf),
                                                           "LC_ALL": "C"})
    if done.returncode != 0:
        print(f"apt_private: apt-get update failed ({done.returncode})", file=sys.stderr)
        return done.returncode
    print(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
