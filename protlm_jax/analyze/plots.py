"""Pictures of projections: PNG (matplotlib) and self-contained HTML (plotly).

A figure is a list of :class:`Panel`: 2-D points with a category each (the
colour), an optional text drawn at each point and a hover text. The HTML
carries plotly.js inline, so it opens offline (no CDN).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np

UNKNOWN = "UNKNOWN"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#bcbd22", "#17becf", "#000000", "#637939", "#ff9896", "#aec7e8", "#7b4173",
            "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#fd8d3c")


@dataclasses.dataclass
class Panel:
    """One scatter plot.

    Attributes:
      title: shown above it.
      xy: [N, 2] coordinates.
      category: N category names (the colour; ``UNKNOWN`` drawn grey, small).
      text: N labels drawn at the points (None: markers only).
      hover: N hover texts (HTML).
    """
    title: str
    xy: np.ndarray
    category: Sequence[str]
    text: Optional[Sequence[str]] = None
    hover: Optional[Sequence[str]] = None


def colours(categories: Sequence[str], fixed: Optional[Mapping[str, str]] = None) -> dict:
    """A colour per category: ``fixed`` first, then a palette in order of appearance."""
    out = dict(fixed or {})
    free = [c for c in _PALETTE if c not in out.values()]
    for c in categories:
        if c not in out:
            out[c] = "#b0b0b0" if c == UNKNOWN else free[len(out) % len(free)]
    return out


def _grid(n: int) -> tuple:
    cols = min(n, 2)
    return int(math.ceil(n / cols)), cols


def write_png(panels: Sequence[Panel], path: str, *, suptitle: str = "",
              palette: Optional[Mapping[str, str]] = None, order: Sequence[str] = ()) -> str:
    """The panels in a grid of two columns, one legend; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(order) + [c for p in panels for c in p.category if c not in order]
    cmap = colours(dict.fromkeys(cats), palette)
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 5.2 * rows), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        cat = np.asarray(panel.category)
        for c in dict.fromkeys(cats):
            sel = cat == c
            if not sel.any():
                continue
            small = c == UNKNOWN or panel.text is None
            ax.scatter(panel.xy[sel, 0], panel.xy[sel, 1], s=9 if small else 240,
                       c=cmap[c], label=c, alpha=0.8 if small else 0.9, linewidths=0)
        if panel.text is not None:
            for (x, y), t in zip(panel.xy, panel.text):
                ax.annotate(t, (x, y), ha="center", va="center", fontsize=8,
                            fontweight="bold", color="white")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    handles, names = [], []
    for ax in axes.ravel():
        for h, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(h)
                names.append(name)
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False, markerscale=1.0 if panels[0].text is not None else 2.0)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96 if suptitle else 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_html(panels: Sequence[Panel], path: str, *, suptitle: str = "",
               palette: Optional[Mapping[str, str]] = None, order: Sequence[str] = ()) -> str:
    """The panels as one interactive plotly page (hover texts; plotly.js inline)."""
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    cats = list(order) + [c for p in panels for c in p.category if c not in order]
    cmap = colours(dict.fromkeys(cats), palette)
    rows, cols = _grid(len(panels))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p.title for p in panels])
    shown = set()
    for n, panel in enumerate(panels):
        cat = np.asarray(panel.category)
        for c in dict.fromkeys(cats):
            sel = np.flatnonzero(cat == c)
            if not len(sel):
                continue
            mode = "markers+text" if panel.text is not None else "markers"
            fig.add_trace(go.Scatter(
                x=panel.xy[sel, 0], y=panel.xy[sel, 1], mode=mode, name=c, legendgroup=c,
                showlegend=c not in shown,
                text=None if panel.text is None else [panel.text[i] for i in sel],
                hovertext=None if panel.hover is None else [panel.hover[i] for i in sel],
                hoverinfo="text" if panel.hover is not None else "x+y",
                marker={"color": cmap[c], "size": 6 if panel.text is None else 16}),
                row=n // cols + 1, col=n % cols + 1)
            shown.add(c)
    fig.update_layout(title=suptitle, template="plotly_white", height=460 * rows,
                      width=620 * cols)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path
