"""Terminal tables that line up in a Chinese terminal.

Python's format specs (`f"{s:<10}"`) count characters, but a terminal gives East Asian wide characters
(汉字, full-width punctuation) two columns. Every lesson that prints a table pads with these instead:

    print(pad("模型", 12) + pad("通过率", 10, ">"))
    print(table([["模型", "通过率"], ["基座", "0.0%"], ["SFT", "67.2%"]], align="<>"))
"""
from __future__ import annotations

import unicodedata


def width(text: str) -> int:
    """Columns the text takes in a terminal: wide (W) and full-width (F) characters count 2, combining marks 0."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in str(text))


def pad(text, cols: int, align: str = "<") -> str:
    """text padded with spaces to `cols` terminal columns: align "<" left, ">" right, "^" centre.
    Text wider than cols is returned unchanged (never cut)."""
    text = str(text)
    gap = max(0, cols - width(text))
    if align == ">":
        return " " * gap + text
    if align == "^":
        return " " * (gap // 2) + text + " " * (gap - gap // 2)
    return text + " " * gap


def table(rows: list[list], align: str = "", sep: str = "  ") -> str:
    """Rows of cells (already formatted as text, or anything str() can show) as aligned lines.
    align: one character per column ("<", ">" or "^"; missing ones default to "<" for the first column and
    ">" for the others, the usual shape of a label column followed by numbers)."""
    rows = [[str(c) for c in r] for r in rows]
    n = max(len(r) for r in rows)
    cols = [max(width(r[i]) for r in rows if i < len(r)) for i in range(n)]
    kinds = [align[i] if i < len(align) else ("<" if i == 0 else ">") for i in range(n)]
    return "\n".join(sep.join(pad(c, cols[i], kinds[i]) for i, c in enumerate(r)).rstrip() for r in rows)
