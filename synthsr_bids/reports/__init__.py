"""HTML reports (fMRIPrep style) with figures drawn by matplotlib.

* :mod:`.figures` slice mosaics, overlays and group plots (matplotlib, Agg, no pyplot state);
* :mod:`.render` Jinja2 templates from ``synthsr_bids/data/reports`` (self-contained HTML:
  inline CSS, figures as relative links, nothing from the network);
* :mod:`.subject` ``sub-<label>.html`` (participant level);
* :mod:`.group` ``group.html`` (group level).
"""
