"""``--plot``: GB/s against size (needs matplotlib, an optional extra)."""

from __future__ import annotations

from typing import Any

from .roofline import Roofline
from .steps import ALL_BACKENDS
from .tables import format_n

_PLOT_HINT = "--plot needs matplotlib, which is optional: pip install 'fastadam[plot]'"


def write_plot(records: list[dict[str, Any]], roofline: Roofline, path: str, title: str) -> None:
    """GB/s against size (log2 x axis), one line per backend and dtype, rooflines dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    keys = sorted(
        {(r["dtype"], r["backend"]) for r in records},
        key=lambda k: (k[0], ALL_BACKENDS.index(k[1])),
    )
    styles = {"float32": "-", "float64": ":"}
    palette = ("tab:gray", "tab:blue", "tab:red", "tab:green", "tab:olive", "tab:purple")
    colors = dict(zip(ALL_BACKENDS, palette, strict=True))
    multi = len({k[0] for k in keys}) > 1
    for dt, backend in keys:
        rs = sorted(
            (r for r in records if r["dtype"] == dt and r["backend"] == backend),
            key=lambda r: r["n"],
        )
        label = f"{backend} {dt}" if multi else backend
        ax.plot(
            [r["n"] for r in rs],
            [r["gbps"] for r in rs],
            styles[dt],
            marker="o",
            color=colors[backend],
            label=label,
        )
    for dt, per_size in roofline.items():
        if len(per_size) == 1:  # measured at the largest size: a ceiling for all sizes
            ((n, gbps),) = per_size.items()
            ax.axhline(gbps, color="black", linestyle="--", linewidth=1)
            ax.annotate(
                f"roofline {dt}: {gbps:.0f} GB/s (at {format_n(n)})",
                (0.01, gbps),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                va="bottom",
                fontsize=8,
            )
        else:
            ns = sorted(per_size)
            ax.plot(
                ns,
                [per_size[n] for n in ns],
                "--",
                color="black",
                linewidth=1,
                label=f"roofline {dt}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements per array")
    ax.set_ylabel("effective GB/s (7 × itemsize bytes/element)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
