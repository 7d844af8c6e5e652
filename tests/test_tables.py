"""common.tables.render_table: the one metric-table renderer of the entrypoint and the evaluation CLIs."""

from __future__ import annotations

import pytest

from common.tables import render_table


def test_render_table_keeps_title_headers_and_cells_in_order_and_refuses_ragged_rows():
    text = render_table("run: final", [("metric", "left"), ("value", "right")], [("val/loss", "1.25"), ("val/f5", "0.5")])
    lines = text.splitlines()
    assert "run: final" in lines[0]
    header = next(line for line in lines if "metric" in line)
    assert header.index("metric") < header.index("value")
    rows = [line for line in lines if "val/" in line]
    assert "val/loss" in rows[0] and "1.25" in rows[0] and "val/f5" in rows[1] and "0.5" in rows[1]
    assert rows[0].rstrip().endswith("1.25 │")  # right-justified value column
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        render_table(None, [("a", "left"), ("b", "left"), ("c", "left")], [("x", "y")])
