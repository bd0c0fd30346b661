"""common/display: padding by terminal columns (East Asian wide characters count 2)."""
from __future__ import annotations

import unicodedata

from common.display import pad, table, width


def test_width_counts_wide_characters_twice():
    assert width("abc") == 3
    assert width("基座") == 4 and width("全参数/LoRA") == 11
    assert width("（）") == 4                          # full-width punctuation
    assert width("e\u0301") == 1                       # a combining accent takes no column


def test_pad_reaches_the_column_count_in_every_alignment():
    for text in ("基座（参考模型）", "SFT", "DPO β=0.1", ""):
        for align in "<>^":
            assert width(pad(text, 20, align)) == 20
    assert pad("基座", 6) == "基座  " and pad("基座", 6, ">") == "  基座"
    assert pad("很长的一段文字", 4) == "很长的一段文字"      # never cut


def test_table_columns_line_up_in_terminal_columns():
    rows = [["模型", "通过率", "平均词数"], ["基座（参考模型）", "0.0%", "41.2"], ["SFT", "67.2%", "23.0"]]
    lines = table(rows).splitlines()
    # the end of every right-aligned number column sits at the same terminal column on each line
    ends = {width(line) for line in lines}
    assert len(ends) == 1, lines
    starts = [width(line[:line.index(cell)]) for line, cell in zip(lines, ["通过率", "0.0%", "67.2%"])]
    assert starts[1] + width("0.0%") == starts[2] + width("67.2%") == starts[0] + width("通过率")


def test_width_agrees_with_unicodedata_on_cjk_block():
    for cp in (0x4E00, 0x6C49, 0x9FA5, 0x3000, 0xFF01):
        assert width(chr(cp)) == 2 and unicodedata.east_asian_width(chr(cp)) in "WF"
