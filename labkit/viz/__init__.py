"""labkit.viz: Bokeh page maps and time series, and ipywidgets explorers, for notebooks.

Views read ``vm.snapshot()`` and ``vm.sample()``; they change a VM only through its public calls
(``qmp``, ``guest``, ``advance``, ``step``). In a notebook, call :func:`setup_notebook` once, then
display a :func:`page_map`, a :class:`TimeSeries` or an :func:`explore` widget.

>>> import labkit, labkit.viz
>>> with labkit.open(memory="1G", seed=0) as vm:
...     pm = labkit.viz.page_map(vm.snapshot())
...     ts = labkit.viz.TimeSeries(vm)
>>> pm.cell, len(ts)
(1, 1)
"""

from __future__ import annotations

import os

from labkit.viz.explorer import Explorer, explore
from labkit.viz.memblocks import MemoryBlockGrid, ResizeTimeline
from labkit.viz.memblocks_explorer import VirtioMemExplorer, explore_virtio_mem
from labkit.viz.migration import MigrationRecorder, MigrationView, comparison
from labkit.viz.migration_explorer import MigrationExplorer, PolicySwitch
from labkit.viz.overcommit import OvercommitView, ReportingExplorer, policy_bars, staircase
from labkit.viz.pagemap import PageMap, page_map
from labkit.viz.palette import GUEST_CATEGORIES, HOST_CATEGORIES, classify
from labkit.viz.tables import Table, metric_table, summary_table, table
from labkit.viz.timeseries import TimeSeries


def setup_notebook() -> None:
    """Load BokehJS into the notebook (quietly) and have every widget displayed show its state at
    display (:func:`labkit.viz.shown.install_display_hook`); run it before showing any plot or
    explorer.

    BokehJS comes from the CDN, or is inlined when ``BOKEH_RESOURCES=inline`` is set in the
    environment (no internet: CI, browser tests, offline machines).
    """
    from bokeh.io import output_notebook
    from bokeh.resources import Resources

    from labkit.viz.shown import install_display_hook

    mode = os.environ.get("BOKEH_RESOURCES", "cdn").strip().lower() or "cdn"
    output_notebook(resources=Resources(mode=mode), hide_banner=True)
    install_display_hook()  # a widget changed before it is displayed shows its state at display


__all__ = ["GUEST_CATEGORIES", "HOST_CATEGORIES", "Explorer", "MigrationExplorer", "MigrationRecorder",
           "MigrationView", "OvercommitView", "PageMap", "PolicySwitch", "ReportingExplorer", "TimeSeries",
           "classify", "comparison", "explore", "page_map", "policy_bars", "setup_notebook", "staircase"]
__all__ += ["MemoryBlockGrid", "ResizeTimeline", "VirtioMemExplorer", "explore_virtio_mem", "Table", "table",
            "metric_table", "summary_table"]
