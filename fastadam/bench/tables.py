"""Formatting: sizes, durations, ratios, and aligned or Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence


def format_n(n: int) -> str:
    """``2^20`` for powers of two, the plain number otherwise."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def format_seconds(s: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_ratio(x: float | None, suffix: str = "×") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, right: Sequence[bool]
) -> str:
    """Aligned plain-text columns, or a Markdown table (``right``: right-align column i)."""
    if markdown:
        sep = ["---:" if r else "---" for r in right]
        lines = [headers, sep, *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        cols = zip(cells, widths, right, strict=True)
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in cols)
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
