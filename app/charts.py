"""plotext charts as Rich Text, for the report and the TUI. Only numbers and our own titles go
into a chart; untrusted names are escaped by the caller (app.safe_text) before they become labels.
plotext keeps global state, so every chart is built under one lock (TUI workers are threads)."""
from __future__ import annotations

import threading

import plotext as plt
from rich.text import Text

_LOCK = threading.Lock()


def line_chart(title: str, series: dict[str, tuple[list[float], list[float]]], width: int, height: int,
               xlabel: str = "", ylabel: str = "", ylim: tuple[float, float] | None = None,
               xticks: list[int] | None = None) -> Text:
    series = {label: xy for label, xy in series.items() if len(xy[0])}  # plotext fails on an empty series
    if not series:
        return Text(f"{title}: nothing to plot")
    with _LOCK:
        plt.clear_figure()
        plt.theme("clear")
        plt.plotsize(max(width, 20), max(height, 5))
        for label, (x, y) in series.items():
            plt.plot(x, y, label=label or None, marker="braille")
        if ylim:
            plt.ylim(*ylim)
        if xticks:
            plt.xticks(xticks, [str(t) for t in xticks])
        plt.title(title)
        plt.xlabel(xlabel)
        plt.ylabel(ylabel)
        return Text.from_ansi(plt.build())


def position_ticks(n: int, count: int = 4) -> list[int]:
    """Whole positions to label an axis of n positions: 0, about every n/count, and the last one."""
    if n <= 1:
        return [0]
    step = max(1, round((n - 1) / count))
    ticks = list(range(0, n, step))
    if n - 1 - ticks[-1] >= step / 2:
        ticks.append(n - 1)
    return ticks


def position_chart(freq, title: str, width: int, height: int = 12) -> Text:
    """Firing frequency by position (the paper's Fig. 7), with whole positions on the axis."""
    return line_chart(title, {"": (list(range(len(freq))), [float(v) for v in freq])}, width, height,
                      xlabel="position", ylim=(0, 1), xticks=position_ticks(len(freq)))
