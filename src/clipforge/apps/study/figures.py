"""The study's figure helpers: matplotlib (the ``plot`` extra) is imported here only, when a figure is made."""
from __future__ import annotations

import statistics
from typing import Sequence


def new_figure(width: float = 6.4, height: float = 4.2):
    """A new matplotlib Figure (not attached to any GUI backend); matplotlib is the ``plot`` extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("the study's figures need matplotlib: pip install 'clipforge[plot]'") from e
    return Figure(figsize=(width, height), layout="constrained")


def bar_figure(title: str, accuracies: dict[str, Sequence[float]], ylabel: str = "zero-shot top-1 (held-out pairs)"):
    """One bar per variant: the mean over seeds, the seeds' standard deviation as an error bar."""
    figure = new_figure()
    axes = figure.add_subplot()
    names = list(accuracies)
    means = [statistics.fmean(accuracies[n]) for n in names]
    spreads = [statistics.stdev(accuracies[n]) if len(accuracies[n]) > 1 else 0.0 for n in names]
    axes.bar(range(len(names)), means, yerr=spreads, capsize=4)
    axes.set_xticks(range(len(names)), names, fontsize=8, rotation=10 if max(map(len, names)) > 16 else 0)
    axes.set(ylabel=ylabel, title=title, ylim=(0, 1))
    return figure
