"""One way every labkit view shows itself in a notebook: as a live ``jupyter_bokeh`` widget.

A view keeps its Bokeh root in ``layout`` (or overrides :meth:`Shown._root`); ``widget()`` wraps it
in one ``BokehModel`` per view (call :func:`labkit.viz.setup_notebook` first), and Jupyter displays
the view through it, with the view's own ``repr`` as the plain-text form.
"""

from __future__ import annotations

from typing import Any


class Shown:
    """Display as a live jupyter_bokeh widget (call ``labkit.viz.setup_notebook()`` first)."""

    layout: Any
    _bokeh_model = None

    def _root(self) -> Any:
        return self.layout

    def widget(self):
        """The view's live ``BokehModel`` widget (created once, then reused)."""
        if self._bokeh_model is None:
            from jupyter_bokeh.widgets import BokehModel
            self._bokeh_model = BokehModel(self._root())
        return self._bokeh_model

    def _repr_mimebundle_(self, **kwargs: Any):
        bundle = self.widget()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict) and "text/plain" in bundle:
            bundle["text/plain"] = repr(self)  # not the widget's long render bundle
        return bundle
