"""Regression checks whose baselines are facts, and ``labkit regress``.

* :mod:`labkit.regress.facts`: the registry (``data/baselines/facts/*.toml``): each check holds a
  metric a notebook writes against a kernel or QEMU fact, a published result in shape, or a
  figure measured on a real guest, with a tolerance and the reason for it.
* :mod:`labkit.regress.measure`: what the regression notebooks under ``notebooks/regression/``
  measure (their outputs are committed; nbval compares them in ``make test``).
* :mod:`labkit.regress.runner`: ``labkit regress [--grid memory=1G,4G seed=0,1,2]`` runs the
  notebooks over the grid on a Dask cluster, stores the run and writes
  :mod:`labkit.regress.report` (Bokeh, with drift against the last stored run).
"""
