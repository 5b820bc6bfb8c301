"""The one table format every benchmark prints: a Markdown table, pasteable into RESULTS.md.

Callers format their own numbers (they know the units and precision); this only lays out columns.
"""
from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    """Rows of cells under `header` as aligned Markdown; `align` has one 'l' or 'r' per column."""
    assert len(align) == len(header) and set(align) <= {"l", "r"}, \
        f"align {align!r} needs one 'l' or 'r' for each of the {len(header)} columns"
    cells = [[str(c) for c in row] for row in rows]
    for i, row in enumerate(cells):
        assert len(row) == len(header), f"row {i} has {len(row)} cells for {len(header)} columns: {row}"
    widths = [max(len(col[j]) for col in [list(header), *cells]) for j in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else "-" * (w + 2)
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells)])
