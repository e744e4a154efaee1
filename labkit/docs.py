"""Citations of labkit's own reference, ``docs/``: the section table and the Markdown links.

Code, tests, notebooks and exercise hints cite the mechanism reference by section number ("§1.2" is
``docs/mechanisms.md`` section 1.2) and published results by anchor (``docs/results.md#wang-hinting``).
Every section heading of ``docs/mechanisms.md`` carries an explicit ``<a id="s1.2"></a>`` anchor, the
one kind of anchor that resolves both in JupyterLab 4 (whose sanitizer turns ``id`` into
``data-jupyter-id``, which its Markdown preview scrolls to) and on GitHub (``user-content-`` ids);
ids derived from heading text differ between the two. See ``docs/README.md``.

This module is tiny and imports nothing heavy, so notebooks and exercise hints can use it freely::

    >>> link("1.2", "notebooks")
    '[§1.2](../docs/mechanisms.md#s1.2)'
    >>> link("3.3", "notebooks/exercises")
    '[§3.3](../../docs/mechanisms.md#s3.3)'
    >>> section_of("s5.5")
    '5.5'
    >>> result_link("duyck-reporting", "notebooks")
    '[Duyck (v17)](../docs/results.md#duyck-reporting)'

``tests/test_docs.py`` holds :data:`SECTIONS` and :data:`RESULTS` against the headings and anchors of
the files, both ways.
"""

from __future__ import annotations

import posixpath
import re

DOCS_DIR = "docs"
MECHANISMS = "mechanisms.md"
RESULTS_FILE = "results.md"

#: every section of docs/mechanisms.md: number -> heading (without the number)
SECTIONS: dict[str, str] = {
    "0": 'Constants that everything else uses (x86-64 guest, 4 KiB pages)',
    "1": 'virtio-balloon: inflate, deflate, statistics, QMP',
    "1.1": 'The device interface',
    "1.2": 'How the Linux driver chases the target',
    "1.3": 'What happens to MemTotal',
    "1.4": 'Deflate on OOM',
    "1.5": 'Memory statistics',
    "1.6": 'The host side of inflate and deflate',
    "1.7": 'QMP: what `balloon` and `query-balloon` mean',
    "2": 'Free page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT` = 3)',
    "2.1": 'The command-ID handshake',
    "2.2": 'What the guest hands over',
    "2.3": 'How QEMU uses hints during migration',
    "3": 'Free page reporting (`VIRTIO_BALLOON_F_REPORTING` = 5)',
    "3.1": 'Constants',
    "3.2": 'What starts a pass',
    "3.3": 'One pass, zone by zone',
    "3.4": 'Driver checks',
    "3.5": 'The host side',
    "4": 'virtio-pmem',
    "4.1": 'The interface',
    "4.2": 'The guest driver',
    "4.3": 'The QEMU device',
    "5": 'virtio-mem',
    "5.1": 'The device interface',
    "5.2": 'The QEMU device',
    "5.3": 'The Linux driver: modes and sizes',
    "5.4": 'Plugging (SBM)',
    "5.5": 'Unplugging, and why it fails',
    "5.6": 'The work loop and its retry timer',
    "5.7": "The guest's hotplug policy",
    "6": 'QEMU pre-copy live migration',
    "6.1": 'Defaults',
    "6.2": 'How an iteration runs',
    "6.3": 'Auto-converge',
    "6.4": 'Zero pages',
    "7": 'Timings and rates at a glance',
    "8": 'Surprises and pitfalls for a faithful model',
    "8.1": 'QMP sizes are logical sizes',
    "8.2": 'MemTotal depends on deflate-on-oom',
    "8.3": 'Hinting restarts after every sync',
    "8.4": 'Reporting can free nothing on the host',
    "8.5": 'Reporting has a gate and a budget',
    "8.6": "virtio-mem's sizes and timers",
    "8.7": 'virtio-mem stops at about 1 GiB offline',
    "8.8": 'The memory block is 128 MiB only below 64 GiB',
    "8.9": 'QEMU syncs only when the backlog is small',
    "8.10": "virtio-pmem's reply, hot-unplug and migration",
    "9": 'Corrections and additions',
    "9.1": 'THP raises min_free_kbytes',
    "9.2": 'Per-CPU page lists',
    "9.3": 'Zones of an x86-64 q35 guest',
    "9.4": 'init_on_alloc',
    "9.5": 'Memory block size',
    "9.6": "virtio-mem's retry timer and config changes",
    "9.7": 'Migration and virtio-mem',
    "9.8": 'Shrinkers run with LRU reclaim',
    "9.9": 'Confirmed values',
    "9.10": "virtio-pmem's 32-bit reply",
    "10": "The guest kernel's memory management",
    "10.1": 'Zones of an x86-64 q35 guest',
    "10.2": 'Watermarks, and how THP raises them',
    "10.3": 'Per-CPU page lists',
    "10.4": 'init_on_alloc',
    "10.5": 'Memory block size',
    "10.6": 'Reclaim and shrinkers',
    "10.7": 'Memory the kernel keeps for itself',
    "11": 'The host side',
    "11.1": 'Backing memory and its page size',
    "11.2": 'What host RSS counts',
    "11.3": 'When the host may not discard',
    "11.4": 'What migration counts as RAM',
    "12": 'The open problems as switches',
    "12.1": 'Host page size and backing',
    "12.2": 'Guest page size',
    "12.3": 'Device assignment and locked memory',
    "12.4": 'Confidential guests',
    "12.5": 'Interface limits',
    "12.6": 'What remains uncertain',
}

#: every anchor of docs/results.md -> what it names
RESULTS: dict[str, str] = {
    "wang-hinting": "Free page hinting: Wei Wang's patch series (2018)",
    "duyck-reporting": "Free page reporting: Alexander Duyck's patch series (v17, 2020)",
    "clark-migration": 'Live migration: Clark et al., NSDI 2005',
    "waldspurger-esx": 'Ballooning in VMware ESX: Waldspurger, OSDI 2002',
    "virtio-mem-hildenbrand": 'virtio-mem (David Hildenbrand)',
    "talk-claims": "The seed talk's own claims",
    "peers": 'Peers: what comparable systems offer',
    "firecracker": 'Firecracker (in the peers table)',
    "user-questions": 'What users of these systems keep asking',
    "gwa-t-12": 'Real memory traces: Bitbrains GWA-T-12',
}

#: short link texts for :func:`result_link`
_RESULT_LABELS = {
    "wang-hinting": "Wang (hinting)",
    "duyck-reporting": "Duyck (v17)",
    "clark-migration": "Clark et al.",
    "waldspurger-esx": "Waldspurger",
    "virtio-mem-hildenbrand": "virtio-mem",
    "firecracker": "Firecracker",
    "gwa-t-12": "GWA-T-12",
}

#: a "§" citation in any text: "§1.2", "§ 8.10", "§5"
CITATION = re.compile(r"§\s?(\d+(?:\.\d+)*)")


def anchor(section: str) -> str:
    """The anchor id of a section of docs/mechanisms.md: ``"1.2"`` -> ``"s1.2"``."""
    number = str(section).strip().lstrip("§").strip()
    if number not in SECTIONS:
        known = ", ".join(sorted(SECTIONS, key=lambda s: [int(p) for p in s.split(".")]))
        raise ValueError(f"no section {section!r} in docs/mechanisms.md; sections are: {known}")
    return "s" + number


def section_of(anchor_id: str) -> str:
    """The inverse of :func:`anchor`: ``"s1.2"`` -> ``"1.2"``."""
    text = str(anchor_id).lstrip("#")
    if not text.startswith("s") or text[1:] not in SECTIONS:
        raise ValueError(f"{anchor_id!r} is not a section anchor of docs/mechanisms.md "
                         "(anchors are 's' + a section number, e.g. 's1.2')")
    return text[1:]


def _relative(target: str, from_dir: str) -> str:
    if from_dir.startswith("/") or "\\" in from_dir or ".." in from_dir.split("/"):
        raise ValueError(f"from_dir must be a folder relative to the repository root, like "
                         f"'notebooks' or 'notebooks/exercises' ('' for the root); got {from_dir!r}")
    return posixpath.relpath(posixpath.join(DOCS_DIR, target), from_dir.strip("/") or ".")


def link(section: str, from_dir: str) -> str:
    """The Markdown link ``[§N.N](…/docs/mechanisms.md#sN.N)`` for a file in ``from_dir``
    (relative to the repository root)."""
    target = anchor(section)
    return f"[§{target[1:]}]({_relative(MECHANISMS, from_dir)}#{target})"


def result_link(key: str, from_dir: str, text: str | None = None) -> str:
    """The Markdown link to a published result of docs/results.md, e.g. ``"wang-hinting"``."""
    if key not in RESULTS:
        raise ValueError(f"no result {key!r} in docs/results.md; anchors are: {', '.join(RESULTS)}")
    label = text or _RESULT_LABELS.get(key, RESULTS[key])
    return f"[{label}]({_relative(RESULTS_FILE, from_dir)}#{key})"
