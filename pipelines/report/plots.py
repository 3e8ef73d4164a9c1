"""The report's charts: matplotlib (Agg) figures as base64 SVG data URIs, rendered deterministically
(fixed `svg.hashsalt`, no date or creator in the metadata, text kept as text) so that rendering the
same material twice gives the same bytes."""
from __future__ import annotations

import base64
import io

import numpy as np

COLORS = {"kept": "#2a9d8f", "dropped": "#e76f51", "quarantined": "#8d99ae"}
STATUSES = ("kept", "dropped", "quarantined")
RC = {
    "svg.hashsalt": "vlcurate-report",
    "svg.fonttype": "none",  # text as <text>: small files, readable in any browser
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "figure.dpi": 100,
    "figure.figsize": (5.2, 3.0),
    "legend.frameon": False,
    "legend.fontsize": 8,
    "path.simplify": False,
}


def pyplot():
    """(matplotlib, pyplot) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return matplotlib, plt


def to_uri(fig) -> str:
    """A figure as a data:image/svg+xml URI (and closes it)."""
    _, plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg",
                metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, figsize=None):
    matplotlib, plt = pyplot()
    with matplotlib.rc_context(RC):
        fig, ax = plt.subplots(figsize=figsize or RC["figure.figsize"])
    ax.set_title(title, loc="left")
    return fig, ax


def _render(build):
    """Run a figure builder with the fixed settings, lay it out, and return its data URI."""
    matplotlib, _ = pyplot()
    with matplotlib.rc_context(RC):
        fig = build()
        _layout(fig)
        return to_uri(fig)


def _text_inches(text: str, size: float) -> float:
    """The width of one line of text at `size` points, in inches, from the font's metrics (no drawing)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    return text_to_path.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0] / 72


def _layout(fig) -> None:
    """The margins of a chart's one axes, set from its own texts (title, axis labels, the widest tick
    label, the legend below) so the figure is drawn once. matplotlib's constrained layout measured them
    by drawing every artist first: about half of a chart's time, and the charts end a small run."""
    import matplotlib

    ax = fig.axes[0]
    width, height = fig.get_size_inches()
    size = matplotlib.rcParams["font.size"]
    line = 1.45 * size / 72  # one line of text, inches
    labels = ax.yaxis.get_major_formatter().format_ticks(list(ax.get_yticks()))
    widest = max((_text_inches(t, size) for t in labels if t), default=0.0)
    left = 0.1 + (line if ax.get_ylabel() else 0.0) + widest + 0.1
    bottom = 0.08 + (line if ax.get_xticks().size else 0.0) + (line if ax.get_xlabel() else 0.0)
    if fig.legends:
        bottom += 1.6 * matplotlib.rcParams["legend.fontsize"] / 72 + 0.08
    top = 0.1 + 1.45 * matplotlib.rcParams["axes.titlesize"] / 72
    fig.subplots_adjust(left=min(0.6, left / width), right=1 - 0.15 / width,
                        bottom=min(0.6, bottom / height), top=max(0.65, 1 - top / height))


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _plain_log(**kw):
    """Log-axis tick labels as plain numbers (0.9, 200, 1e+06) wherever matplotlib's default would put
    a label. Its default writes mathtext (2×10²), whose parsing was a third of the report's drawing."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLog(**kw)


def _legend(ax) -> None:
    """Below the axes, so it never hides data (`_layout` keeps room for it)."""
    ax.figure.legend(loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0))


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def histogram(title: str, xlabel: str, values: dict[str, np.ndarray], *, log: bool = False,
              lines: list[tuple[float, str]] = (), bins: int = 30) -> str:
    """Stacked histogram of a feature by status, with vertical lines at the recipe's thresholds."""

    def build():
        fig, ax = _figure(title)
        data = {s: np.asarray(v, dtype=float) for s, v in values.items()}
        data = {s: v[np.isfinite(v) & ((v > 0) if log else True)] for s, v in data.items()}
        allv = np.concatenate([v for v in data.values()] or [np.array([])])
        if allv.size == 0:
            _empty(ax, xlabel)
            return fig
        lo, hi = float(allv.min()), float(allv.max())
        for x, _ in lines:
            if np.isfinite(x) and (x > 0 or not log):
                lo, hi = min(lo, x), max(hi, x)
        if hi <= lo:
            hi = lo + (abs(lo) * 0.1 if lo else 1.0)
        edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
        order = [s for s in STATUSES if s in data and data[s].size]
        ax.hist([data[s] for s in order], bins=edges, stacked=True, histtype="stepfilled", color=[COLORS[s] for s in order],
                label=[f"{s} ({data[s].size})" for s in order])
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(_plain_log())
            ax.xaxis.set_minor_formatter(_plain_log(labelOnlyBase=False))
        for x, label in lines:
            ax.axvline(x, color="#264653", linestyle="--", linewidth=1)
            ax.text(x, ax.get_ylim()[1] * 0.97, f" {label}", rotation=90, va="top", ha="right", fontsize=7,
                    color="#264653")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("items")
        ax.yaxis.set_major_locator(_integer_ticks())
        _legend(ax)
        return fig

    return _render(build)


def stacked_bars(title: str, labels: list[str], counts: dict[str, list[int]]) -> str:
    """Horizontal bars per label, stacked by status (languages)."""

    def build():
        fig, ax = _figure(title, (5.2, max(1.6, 0.22 * len(labels) + 0.8)))
        if not labels:
            _empty(ax, "values")
            return fig
        y = np.arange(len(labels))[::-1]
        left = np.zeros(len(labels))
        for s in STATUSES:
            c = np.asarray(counts.get(s, [0] * len(labels)), dtype=float)
            if c.sum():
                ax.barh(y, c, left=left, color=COLORS[s], label=s, height=0.7)
                left += c
        ax.set_yticks(y, labels)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlabel("items")
        _legend(ax)
        return fig

    return _render(build)


def paired_bars(title: str, labels: list[str], before: list[int], after: list[int]) -> str:
    """Two bars per label: before and after balancing (concepts)."""

    def build():
        fig, ax = _figure(title, (5.2, max(1.6, 0.26 * len(labels) + 0.8)))
        if not labels:
            _empty(ax, "concepts")
            return fig
        y = np.arange(len(labels))[::-1]
        ax.barh(y + 0.2, before, height=0.4, color="#adb5bd", label="before balancing")
        ax.barh(y - 0.2, after, height=0.4, color=COLORS["kept"], label="after (kept)")
        ax.set_yticks(y, labels)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlabel("items matching the concept")
        _legend(ax)
        return fig

    return _render(build)


def warm() -> None:
    """Draw and throw away one chart of each sort the report draws. A process's first chart costs
    ~0.5 s more than the next ones (the SVG backend and mathtext loaded, font metrics cached): a run
    pays it in a background thread while its curation runs (pipelines/build.py `preload`), not at its
    end. matplotlib is not thread-safe: the report waits for this before it draws."""
    histogram("warm", "x", {"kept": np.array([1.0, 10.0, 100.0]), "dropped": np.array([5.0])}, log=True,
              lines=[(3.0, "min")])
    stacked_bars("warm", ["en", "zh"], {"kept": [2, 1], "dropped": [1, 0]})
