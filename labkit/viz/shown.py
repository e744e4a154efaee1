"""One way every labkit view shows itself in a notebook: as a live ``jupyter_bokeh`` widget, whose
updates reach the browser in as few messages as possible.

A view keeps its Bokeh root in ``layout`` (or overrides :meth:`Shown._root`); ``widget()`` wraps it
in one :class:`LiveBokeh` per view (call :func:`labkit.viz.setup_notebook` first), and Jupyter
displays the view through it, with the view's own ``repr`` as the plain-text form.

:class:`LiveBokeh` is ``jupyter_bokeh``'s ``BokehModel`` with two changes that matter for a widget
that redraws on every Step or Play tick:

* **One message set per frame.** ``BokehModel`` sends every document change (a patch of the image,
  a streamed row, a new legend, a title) as its own ``PATCH-DOC`` message, and each of those as
  three comm messages (header, metadata, content) plus two per binary buffer: a Step of the
  explorer made ~20 comm messages, which the Jupyter server forwards and the browser decodes one by
  one. Inside ``with live.batch():`` the changes are collected and sent as ONE ``PATCH-DOC``
  holding all of them (Bokeh's ``PATCH-DOC`` takes a list of events; BokehJS applies them in order).
* **Less echo.** After it applies a patch, jupyter_bokeh's BokehView sends the change events the
  patch raised back to the kernel (its ``_pending_events``), so every streamed row came back as a
  ``ColumnsStreamed`` event that ``BokehModel._sync_model`` streamed into the source a second time.
  The kernel's own data changes (``ColumnsStreamed``, ``ColumnsPatched``, a new ``data``) are
  dropped here; range changes and Bokeh events (``RangesUpdate``: zooming) still come through.
  The echo cannot be stopped at its source (jupyter_bokeh's JavaScript), but ``combine_events``
  makes the browser hold its messages while the kernel is busy and keep only the newest per model
  attribute, so a Play run's echo stays a trickle.

**What is shown is the state at display.** jupyter_bokeh renders a view from the widget's
``render_bundle``, made when the widget was created, and applies later changes as patches; but the
patches go to the views that exist, and a widget changed before it is displayed (an explorer
stepped in the cell that shows it, a view updated in an earlier cell) has none yet: those changes
were lost, and the browser drew the widget as it was made. So a :class:`LiveBokeh` that sent a
patch is *stale*, and :func:`refresh_stale` re-makes the bundle of every stale one in a widget tree.
:func:`install_display_hook` (``labkit.viz.setup_notebook`` calls it) runs it whenever IPython
displays a widget, and :meth:`Shown._repr_mimebundle_` when a view shows itself.

>>> from bokeh.plotting import figure
>>> live = LiveBokeh(figure())
>>> with live.batch():
...     with live.batch():              # nested batches are one batch
...         pass
>>> live.sent_messages
0
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bokeh.core.serialization import Serializer
from bokeh.document.json import PatchJson
from bokeh.protocol.messages.patch_doc import patch_doc
from jupyter_bokeh.widgets import BokehModel

# events the browser echoes back after applying the kernel's own patch: never from a user here
ECHOED_KINDS = ("ColumnsStreamed", "ColumnsPatched")
ECHOED_ATTRS = ("data",)


class LiveBokeh(BokehModel):
    """``BokehModel`` that batches a frame's changes into one ``PATCH-DOC`` (:meth:`batch`) and
    ignores the browser's echo of the kernel's own data changes; see the module docstring.
    ``sent_messages`` and ``sent_events`` count what was sent (for benchmarks and tests)."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        self._held: list | None = None
        self.sent_messages = 0
        self.sent_events = 0
        self.stale = False  # a patch was sent since render_bundle was made (see the module docstring)
        # the browser queues its messages to the kernel while the kernel is busy and keeps only the
        # newest per model attribute (jupyter_bokeh's combine_events): the echo of a Play run's
        # frames stays a trickle instead of one message per changed model per frame
        kwargs.setdefault("combine_events", True)
        super().__init__(model, **kwargs)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Collect every document change made inside, and send them as one message set at the end."""
        if self._held is not None:  # nested: the outer batch sends
            yield
            return
        self._held = []
        try:
            yield
        finally:
            events, self._held = self._held, None
            if events:
                self._send_events(events)

    def _document_patched(self, event: Any) -> None:
        if event.setter is self:
            return
        if self._held is not None:
            self._held.append(event)
        else:
            self._send_events([event])

    def _send_events(self, events: list) -> None:
        msg = inline_patch(events)
        parts: list[tuple[dict, list]] = [({"msg": "patch", "payload": msg.header_json}, []),
                                          ({"msg": "patch", "payload": msg.metadata_json}, []),
                                          ({"msg": "patch", "payload": msg.content_json}, [])]
        for buffer in msg.buffers:
            parts += [({"msg": "patch", "payload": json.dumps(buffer.ref)}, []),
                      ({"msg": "patch"}, [buffer.to_bytes()])]
        for content, buffers in parts:
            self.send(content, buffers or None)
        self.sent_messages += len(parts)
        self.sent_events += len(events)
        self.stale = True

    def refresh(self) -> None:
        """Make ``render_bundle`` the document as it is now: a view created from here on draws the
        current state (views that exist already redraw from it)."""
        self.render_bundle = self._model_to_traits(self._model)
        self.stale = False

    def _sync_model(self, model: Any, content: dict[str, Any], buffers: list[Any]) -> None:
        kind = content.get("kind")
        if kind in ECHOED_KINDS or (kind == "ModelChanged" and content.get("attr") in ECHOED_ATTRS):
            return  # the browser's echo of a change the kernel made: applying it again would
            # stream the same rows twice
        super()._sync_model(model, content, buffers)


def inline_patch(events: list) -> patch_doc:
    """Bokeh's ``PATCH-DOC`` message for ``events`` (one document's), as ``PATCH-DOC.create`` makes
    it but with numpy arrays inside the JSON (base64) instead of as binary buffers: a buffer costs
    two more comm messages, and the arrays a frame sends (an image patch) are a few KiB."""
    doc = events[0].document
    serializer = Serializer(references=doc.models.synced_references, deferred=False)
    content = PatchJson(events=serializer.encode(events))
    doc.models.flush_synced(lambda model: not serializer.has_ref(model))
    return patch_doc(patch_doc.create_header(), {}, content)


def refresh_stale(widget: Any) -> int:
    """Re-make the bundle of every stale :class:`LiveBokeh` in ``widget``'s tree (itself and its
    ``children``, recursively); returns how many."""
    done, stack, seen = 0, [widget], set()
    while stack:
        w = stack.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        if isinstance(w, LiveBokeh) and w.stale:
            w.refresh()
            done += 1
        stack.extend(getattr(w, "children", None) or ())
    return done


def _current_bundle(widget: Any) -> Any:
    refresh_stale(widget)
    return widget._repr_mimebundle_()


def install_display_hook(shell: Any = None) -> bool:
    """Have IPython refresh stale :class:`LiveBokeh` widgets in every widget it displays (see the
    module docstring); returns whether there was an IPython to install it in."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        return False
    from ipywidgets import Widget

    shell.display_formatter.mimebundle_formatter.for_type(Widget, _current_bundle)
    return True


@contextmanager
def batched(*views: Any) -> Iterator[None]:
    """``with batched(view, ...):`` every change of the views' live widgets made inside goes to the
    browser as one message set per widget (views not shown yet are skipped)."""
    with ExitStack() as stack:
        for view in views:
            model = view if isinstance(view, LiveBokeh) else getattr(view, "_bokeh_model", None)
            if isinstance(model, LiveBokeh):
                stack.enter_context(model.batch())
        yield


class Shown:
    """Display as a live jupyter_bokeh widget (call ``labkit.viz.setup_notebook()`` first)."""

    layout: Any
    _bokeh_model = None

    def _root(self) -> Any:
        return self.layout

    def widget(self) -> LiveBokeh:
        """The view's live :class:`LiveBokeh` widget (created once, then reused)."""
        if self._bokeh_model is None:
            self._bokeh_model = LiveBokeh(self._root())
        return self._bokeh_model

    def _repr_mimebundle_(self, **kwargs: Any):
        refresh_stale(self.widget())
        bundle = self.widget()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict) and "text/plain" in bundle:
            bundle["text/plain"] = repr(self)  # not the widget's long render bundle
        return bundle
