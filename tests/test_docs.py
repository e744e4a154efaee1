"""The project's own reference (docs/) and every citation of it.

* Nothing tracked names the external research notes or a path of a development machine (rule below).
* Every "§N.N" anywhere in the repository (py, md, ipynb) names a section of docs/mechanisms.md, and
  every Markdown link into docs/ resolves to a file and an anchor that exists, computed the way
  JupyterLab 4 and GitHub compute them (docs/README.md, "Why the links look like that").
* Every external link in docs/ is pinned to a tag or a commit, and every source link names a function
  or constant.
* labkit.docs' tables match the files both ways.
* In a real browser (marker ``browser``): a notebook's § link opens the reference in JupyterLab's
  Markdown preview scrolled to that section.

The path rule. A tracked file must not contain:
  - the research notes' folder name followed by a slash (as a word only: a "non-" prefix is fine);
  - an absolute path into a person's or the build machine's own folders: the top-level folders
    "work", "root" and "Users", or "home/<name>/";
  - a temporary path made by a run (pytest's "pytest-of-<user>", the job runner's "bash_jobs",
    mkdtemp's "tmp" + random letters);
  - in a notebook, Markdown file or data file, any path under the temporary folder at all.
System paths (the chromium binary under /usr/bin, /dev/kvm, /proc/...) are fine, and so are the fixed
temporary paths that unit tests and doctests pass as example arguments in .py files: they name no
machine's file, they are inputs (e.g. a QMP socket path that is only formatted into a command line).

Every tracked file is held to these rules, notebooks, exercise hints, views and browser tests
included; in a notebook's Markdown every "§" is a link into docs/ (``labkit.docs.link``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from labkit import docs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".toml", ".cfg", ".json", ".csv", ".yml", ".yaml",
                 ".sh", ".rst", ""}

_NOTES = "shared" + "/"
_TMP = "/" + "tmp" + "/"
FORBIDDEN = [
    (re.compile(r"(?<![\w-])" + re.escape(_NOTES)), "names the research notes' folder"),
    (re.compile(r"(?<![\w.~-])/(?:" + "work" + "|" + "root" + "|" + "Users" + r")/"),
     "absolute path into a machine's own folders"),
    (re.compile(r"(?<![\w.~-])/" + "home" + r"/[A-Za-z0-9_.-]+/"), "absolute path into a home folder"),
    (re.compile(re.escape(_TMP) + r"(?:pytest-of-|bash_jobs|tmp[a-z0-9_]{6,})"),
     "temporary path made by a run"),
]
TMP_ANYWHERE = re.compile(r"(?<![\w.~-])" + re.escape(_TMP) + r"\S")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # an sdist without .git
        pytest.skip(f"not a git checkout: {e}")
    return [name for name in out.split("\0") if name]


def text_of(name: str) -> str | None:
    path = ROOT / name
    if path.suffix not in TEXT_SUFFIXES or not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def path_violations(name: str, text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in FORBIDDEN:
            if pattern.search(line):
                found.append(f"{name}:{number}: {why}: {line.strip()[:120]}")
        if Path(name).suffix != ".py" and TMP_ANYWHERE.search(line):
            found.append(f"{name}:{number}: temporary path outside code: {line.strip()[:120]}")
    return found


# --- anchors, the way each renderer computes them ---------------------------------------------------
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"<a\s+id=\"([^\"]+)\"\s*>")
TAG = re.compile(r"<[^>]+>")


def heading_texts(markdown: str) -> list[str]:
    """The text of each ATX heading (outside fenced code), inline HTML removed, backticks dropped."""
    texts, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            texts.append(TAG.sub("", match.group(2)).replace("`", ""))
    return texts


def jupyterlab_id(text: str) -> str:
    """JupyterLab 4's createHeaderId: the heading's text, spaces turned into '-', case kept."""
    return text.replace(" ", "-")


def github_slug(text: str) -> str:
    """GitHub's heading slug: lower case, punctuation dropped, spaces turned into '-'."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors_of(path: Path) -> dict[str, set[str]]:
    """The fragments that resolve in a Markdown file, per renderer. Explicit ``<a id>`` anchors count
    for both (JupyterLab keeps them as data-jupyter-id, GitHub as user-content- ids)."""
    text = path.read_text(encoding="utf-8")
    explicit = set(EXPLICIT_ANCHOR.findall(text))
    headings = heading_texts(text)
    return {"jupyterlab": explicit | {jupyterlab_id(h) for h in headings},
            "github": explicit | {github_slug(h) for h in headings}}


def test_anchor_rules_match_the_renderers():
    """The two heading-id rules, on a heading like ours: they differ, which is why links use explicit
    anchors."""
    text = heading_texts('### <a id="s1.2"></a>1.2 How the `Linux` driver chases the target')[0]
    assert jupyterlab_id(text) == "1.2-How-the-Linux-driver-chases-the-target"
    assert github_slug(text) == "12-how-the-linux-driver-chases-the-target"


# --- (a) no research-notes folder, no machine paths ---------------------------------------------------
def _violations() -> list[str]:
    found = []
    for name in tracked_files():
        text = text_of(name)
        if text is not None:
            found += path_violations(name, text)
    return found


def test_no_research_notes_or_machine_paths():
    found = _violations()
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line, bad", [
    ("see " + _NOTES + "reference/mechanisms.md", True),
    ("see ../" + _NOTES + "screenshots", True),
    ("a non-" + _NOTES + "thing", False),
    ("/" + "work/main/.venv/bin/python", True),
    ("/" + "root/.cache/labkit", True),
    ("/" + "home/alice/labkit", True),
    (_TMP + "pytest-of-root/pytest-3/x", True),
    ("/usr/bin/chromium, /dev/kvm, /proc/meminfo", False),
])
def test_path_rule(line, bad):
    assert bool(path_violations("x.py", line)) is bad


def test_temporary_paths_only_as_code_arguments():
    assert not path_violations("x.py", 'qemu_command(config, "' + _TMP + 'labkit-qemu-x")')
    assert path_violations("notes.md", "the log is in " + _TMP + "lab/jupyter.log")


# --- (b) every § resolves, every link into docs/ resolves ---------------------------------------------
def citations(text: str) -> list[str]:
    return docs.CITATION.findall(text)


def markdown_of(name: str, text: str) -> str:
    """The Markdown a file shows a reader: a notebook's markdown cells, a .md file, or (for .py) the
    source, where links appear in docstrings."""
    if name.endswith(".ipynb"):
        cells = json.loads(text).get("cells", [])
        return "\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "markdown")
    return text


LINK = re.compile(r"\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def doc_links(name: str, markdown: str) -> list[tuple[str, str]]:
    """(target file relative to the root, fragment) of each relative link that points into docs/."""
    found = []
    for match in LINK.finditer(markdown):
        href = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", href) or href.startswith("#") and not name.startswith("docs/"):
            continue
        path, _, fragment = href.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(name), unquote(path))) if path else name
        if target.startswith("docs" + os.sep) or target == "docs":
            found.append((target, fragment))
    return found


def _unresolved() -> list[str]:
    anchors: dict[str, dict[str, set[str]]] = {}
    bad = []
    for name in tracked_files():
        if not name.endswith((".py", ".md", ".ipynb")):
            continue
        text = text_of(name)
        if text is None:
            continue
        for number in citations(text):
            if number not in docs.SECTIONS:
                bad.append(f"{name}: §{number} is not a section of docs/mechanisms.md")
        for target, fragment in doc_links(name, markdown_of(name, text)):
            path = ROOT / target
            if not path.is_file():
                bad.append(f"{name}: link to {target}, which does not exist")
                continue
            if fragment and path.suffix == ".md":
                known = anchors.setdefault(target, anchors_of(path))
                if fragment not in known["jupyterlab"] or fragment not in known["github"]:
                    bad.append(f"{name}: {target}#{fragment} is not an anchor there "
                               f"(in JupyterLab: {fragment in known['jupyterlab']}, "
                               f"on GitHub: {fragment in known['github']})")
    return bad


def test_every_citation_and_docs_link_resolves():
    bad = _unresolved()
    assert not bad, "\n".join(bad)


BARE_CITATION = re.compile(r"(?<!\[)§\s?\d+(?:\.\d+)*(?!\]\()")


def bare_citations(markdown: str) -> list[str]:
    """The "§N.N" of ``markdown`` that are not the text of a link."""
    return BARE_CITATION.findall(markdown)


def test_every_citation_in_a_notebook_is_a_link():
    """Students read notebooks in JupyterLab or on GitHub: a "§" there must open the section."""
    bare = []
    for name in tracked_files():
        if name.endswith(".ipynb"):
            text = text_of(name)
            bare += [f"{name}: {c}" for c in bare_citations(markdown_of(name, text))] if text else []
    assert not bare, "citations that are not links (use labkit.docs.link):\n" + "\n".join(bare)


def test_bare_citations_are_found():
    linked = docs.link("1.2", "notebooks")
    assert bare_citations(f"see {linked} and §1.7, also [§2.1](x.md#s2.1)") == ["§1.7"]


def test_citation_checker_catches_a_dead_section_and_anchor(tmp_path):
    dead = "§" + "99.3"  # built here so that this file itself cites no dead section
    assert citations(f"see §1.2 and § 8.10, also {dead}") == ["1.2", "8.10", "99.3"]
    assert "99.3" not in docs.SECTIONS
    missing = "[x](" + "../docs/nope.md#a)"
    links = doc_links("notebooks/x.ipynb", "[§1.2](../docs/mechanisms.md#s1.2) " + missing)
    assert links == [("docs/mechanisms.md", "s1.2"), ("docs/nope.md", "a")]
    known = anchors_of(DOCS / "mechanisms.md")
    assert "s1.2" in known["jupyterlab"] and "s1.2" in known["github"]
    assert "s99.1" not in known["jupyterlab"]


# --- the tables of labkit.docs against the files --------------------------------------------------------
def test_sections_table_matches_the_headings_both_ways():
    text = (DOCS / "mechanisms.md").read_text(encoding="utf-8")
    headings = {number: title.replace("`", "") for number, title in
                re.findall(r'^#{2,3} <a id="s([0-9.]+)"></a>\1\.? (.+)$', text, flags=re.MULTILINE)}
    table = {number: title.replace("`", "") for number, title in docs.SECTIONS.items()}
    assert headings == table
    every_anchor = EXPLICIT_ANCHOR.findall(text)
    assert sorted(every_anchor) == sorted(docs.anchor(n) for n in docs.SECTIONS), "stray or missing anchor"
    # every section heading has its anchor; the § numbers the code used before docs/ existed are there
    numbered = re.findall(r"^#{2,3} (?!<a id)([0-9]+(?:\.[0-9]+)*)\b", text, flags=re.MULTILINE)
    assert not numbered, f"headings without an anchor: {numbered}"
    for kept in ["0", "1.1", "1.7", "2.3", "3.5", "4.3", "5.7", "6.4", "7", "8.10", "9"]:
        assert kept in docs.SECTIONS


def test_results_table_matches_the_anchors_both_ways():
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    assert set(EXPLICIT_ANCHOR.findall(text)) == set(docs.RESULTS)


def test_anchors_are_plain_ascii():
    """JupyterLab looks the fragment up as the link's URL-encoded hash: a non-ASCII id never matches."""
    for name in ("mechanisms.md", "results.md"):
        for anchor_id in EXPLICIT_ANCHOR.findall((DOCS / name).read_text(encoding="utf-8")):
            assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", anchor_id), (name, anchor_id)


def test_link_and_inverse():
    assert docs.link("5.5", "notebooks") == "[§5.5](../docs/mechanisms.md#s5.5)"
    assert docs.link("§0", "") == "[§0](docs/mechanisms.md#s0)"
    assert docs.link("9.10", "labkit/exercises") == "[§9.10](../../docs/mechanisms.md#s9.10)"
    for number in docs.SECTIONS:
        assert docs.section_of(docs.anchor(number)) == number
    assert (docs.result_link("wang-hinting", "notebooks")
            == "[Wang (hinting)](../docs/results.md#wang-hinting)")


@pytest.mark.parametrize("call, message", [
    (lambda: docs.link("99.3", "notebooks"), "no section '99.3'"),
    (lambda: docs.link("1.2", "/abs/notebooks"), "relative to the repository root"),
    (lambda: docs.link("1.2", "../elsewhere"), "relative to the repository root"),
    (lambda: docs.section_of("1.2"), "not a section anchor"),
    (lambda: docs.result_link("nobody", "notebooks"), "no result 'nobody'"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# --- (c) every external link in docs/ is pinned -----------------------------------------------------------
URL = re.compile(r"https?://[^\s)>\]]+")
PINNED = [
    # a file of a repository at a release tag or a full commit
    re.compile(r"https://github\.com/[\w.-]+/[\w.-]+/blob/(?:v\d+(?:\.\d+)+|[0-9a-f]{40})/[^#\s]+"
               r"(?:#L\d+)?$"),
    # the virtio specification: the version and the committee stage are in the path
    re.compile(r"https://docs\.oasis-open\.org/virtio/virtio/v\d+\.\d+/cs\d+/[\w.-]+\.html$"),
]


def external_links() -> list[tuple[str, str]]:
    return [(path.name, url) for path in sorted(DOCS.glob("*.md"))
            for url in URL.findall(path.read_text(encoding="utf-8"))]


def test_docs_have_source_links():
    links = external_links()
    assert sum("/torvalds/linux/blob/v6.1/" in url for _, url in links) > 50
    assert sum("/qemu/qemu/blob/v7.2.0/" in url for _, url in links) > 50


def test_every_external_link_in_docs_is_pinned():
    loose = [f"{name}: {url}" for name, url in external_links()
             if not any(p.match(url) for p in PINNED)
             or re.search(r"/(?:master|main|HEAD|latest)(?:/|$)", url)]
    assert not loose, "unpinned links:\n" + "\n".join(loose)


def test_pinned_rule_rejects_branches():
    assert not any(p.match("https://github.com/torvalds/linux/blob/master/mm/page_reporting.c")
                   for p in PINNED)
    assert not any(p.match("https://elixir.bootlin.com/linux/latest/source/mm/page_alloc.c")
                   for p in PINNED)


def test_source_links_name_a_function_or_constant():
    """Each link to a C source or header names what to look for in it (a function or a constant)."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))
    bare = [m.group(0) for m in re.finditer(r"\[([^\]]+)\]\((https://github\.com/[^)]+\.[ch](?:#L\d+)?)\)",
                                            text) if "`" not in m.group(1)]
    assert not bare, "source links without a symbol:\n" + "\n".join(bare)


# --- the link convention in a real JupyterLab ---------------------------------------------------
@pytest.mark.browser
def test_section_links_open_in_jupyterlab(tmp_path):
    """A notebook in notebooks/ links to §1.2, §5.5, §8.10, §10.2 and a published result; clicking each
    opens the reference in JupyterLab's Markdown preview with that section at the top of the view (or
    the view scrolled to its end, for a section too close to the end to reach the top)."""
    from tests.browser.conftest import CHROMIUM_ARGS, browser_unavailable, chromium_path, private_home

    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    import secrets
    import shutil
    import signal
    import sys

    from playwright.sync_api import sync_playwright

    from labkit.cli import any_free_port, lab_ready

    root = tmp_path / "repo"
    shutil.copytree(DOCS, root / "docs")
    (root / "notebooks").mkdir()
    targets = [("§1.2", "s1.2"), ("§5.5", "s5.5"), ("§8.10", "s8.10"), ("§10.2", "s10.2"),
               ("Duyck (v17)", "duyck-reporting")]
    cell = " · ".join([docs.link(n[1:], "notebooks") for n, _ in targets[:-1]]
                      + [docs.result_link("duyck-reporting", "notebooks")])
    notebook = {"cells": [{"cell_type": "markdown", "id": "links", "metadata": {}, "source": [cell]}],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                            "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    (root / "notebooks" / "links.ipynb").write_text(json.dumps(notebook))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    config = tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "default_setting_overrides.json").write_text(json.dumps(
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    env = dict(os.environ, **private_home(tmp_path / "home"), JUPYTER_CONFIG_DIR=str(config),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(config / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(config / "workspaces"), JUPYTER_TOKEN=secrets.token_hex(24))
    env.pop("JUPYTER_PATH", None)
    port = any_free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")
    with open(tmp_path / "jupyter.log", "wb") as log:
        server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"screenshots: {shots}")
    try:
        deadline = time.monotonic() + 120
        while not lab_ready(port, env["JUPYTER_TOKEN"]):
            assert server.poll() is None and time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/lab/tree/notebooks/links.ipynb?reset&token={env['JUPYTER_TOKEN']}"

        # Playwright's sync API refuses a thread with a running asyncio loop (the notebook tests
        # leave one in this process): drive the browser from a thread of its own
        def click_through() -> None:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                            args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for number, (text, anchor_id) in enumerate(targets):
                    page.goto(url)
                    page.wait_for_selector(".jp-MarkdownOutput a", timeout=60_000)
                    page.locator(".jp-MarkdownOutput a", has_text=text).first.click()
                    viewer = page.locator(".jp-MarkdownViewer:visible").last
                    viewer.wait_for(timeout=30_000)
                    target = viewer.locator(f'[data-jupyter-id="{anchor_id}"]')
                    target.wait_for(state="attached", timeout=30_000)
                    where = None
                    for _ in range(50):  # the preview renders, then scrolls
                        where = page.evaluate(
                            """(id) => { const el = [...document.querySelectorAll('.jp-MarkdownViewer')]
                                  .map(v => v.querySelector(`[data-jupyter-id="${id}"]`)).find(e => e);
                                let box = el.parentElement;  // the element that scrolls the preview
                                while (box && !(box.scrollHeight > box.clientHeight + 1 &&
                                       ['auto', 'scroll'].includes(getComputedStyle(box).overflowY))) {
                                  box = box.parentElement; }
                                const top = el.getBoundingClientRect().top - box.getBoundingClientRect().top;
                                const end = box.scrollTop + box.clientHeight >= box.scrollHeight - 2;
                                return {top, end, scrolled: box.scrollTop}; }""", anchor_id)
                        if where["scrolled"] > 0 and (abs(where["top"]) < 80 or where["end"]):
                            break
                        time.sleep(0.1)
                    page.screenshot(path=str(shots / f"{number}-{anchor_id}.png"))
                    assert where["scrolled"] > 0 and (abs(where["top"]) < 80 or where["end"]), \
                        f"{text}: the preview did not scroll to #{anchor_id} ({where})"
                browser.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(click_through).result()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
