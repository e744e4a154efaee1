"""labkit/viz/shown.py: what a widget shows at display is its state then (see the browser test
tests/browser/test_display_state.py for the same in JupyterLab), and a frame's changes go as one
message set."""

from __future__ import annotations

import json

import ipywidgets as widgets
from bokeh.plotting import figure
from IPython.core.interactiveshell import InteractiveShell

import labkit
from labkit.viz.memblocks_explorer import explore_virtio_mem
from labkit.viz.shown import LiveBokeh, _current_bundle, install_display_hook, refresh_stale


def bundle_text(live: LiveBokeh) -> str:
    return json.dumps(live.render_bundle["docs_json"])


def test_a_patch_makes_the_widget_stale_and_refresh_rebundles():
    f = figure(title="made")
    live = LiveBokeh(f)
    assert not live.stale and '"made"' in bundle_text(live)
    f.title.text = "changed"           # sent as a patch, to views that may not exist yet
    assert live.stale and live.sent_messages == 3 and '"made"' in bundle_text(live)
    live.refresh()
    assert not live.stale and '"changed"' in bundle_text(live) and '"made"' not in bundle_text(live)


def test_refresh_stale_walks_the_widget_tree_and_leaves_fresh_widgets_alone():
    a, b = figure(title="a"), figure(title="b")
    live_a, live_b = LiveBokeh(a), LiveBokeh(b)
    tree = widgets.VBox([widgets.HBox([widgets.Label("x"), live_a]), live_b])
    a.title.text = "a2"
    bundle_b = live_b.render_bundle
    assert refresh_stale(tree) == 1
    assert '"a2"' in bundle_text(live_a) and live_b.render_bundle is bundle_b
    assert refresh_stale(tree) == 0


def test_the_display_hook_shows_an_explorer_stepped_before_display():
    shell = InteractiveShell.instance()
    assert install_display_hook(shell)
    ex = explore_virtio_mem(memory="1G", seed=0, balloon=False, memhp_default_state="online_movable",
                            virtio_mem=[{"id": "vm0", "size": "2G"}])
    try:
        ex.slider.value = 300
        ex.tick()
        assert "0 B plugged" in bundle_text(ex.live)  # what the browser would have drawn
        data, _ = shell.display_formatter.format(ex)
        assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.model_id
        assert "300 MiB plugged" in bundle_text(ex.live) and not ex.live.stale
    finally:
        ex.vm.close()
        InteractiveShell.clear_instance()  # no IPython left behind for the other tests


def test_a_view_that_shows_itself_is_current():
    with labkit.open(memory="256M", seed=0) as vm:
        series = labkit.viz.TimeSeries([vm.sample()], width=300)
        live = series.widget()
        series.guest_figure.title.text = "later"
        series._repr_mimebundle_()
        assert '"later"' in bundle_text(live)
        assert _current_bundle(live)["application/vnd.jupyter.widget-view+json"]["model_id"] == live.model_id
