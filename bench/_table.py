"""Printing benchmark results: one plain-text grid, the same in every benchmark."""

from __future__ import annotations


def verdict(passed: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[passed]


def print_grid(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in [headers, *rows]) for i in range(len(headers))]
    for line in [headers, ["-" * width for width in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def summary_figure(row: dict) -> str:
    """A summary row's figure (its `value`, else its `ratio`): a float to three places unless the row gives
    its own `format` (a signed difference to four, where three would show a near tie as 0.000)."""
    value = row.get("value", row.get("ratio"))
    if isinstance(value, float):
        return row.get("format", "{:.3f}").format(value)
    return "" if value is None else str(value)
