"""Metric tables for the terminal: one rich table rendered to plain text, shared by the training entrypoint and the
evaluation CLIs."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence


def render_table(title: str | None, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]],
                 width: int = 100) -> str:
    """``columns``: (header, justify: left | right | center); ``rows``: one string per column -> the table as text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header, justify in columns:
        table.add_column(header, justify=justify)
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"render_table: a row has {len(row)} cells for {len(columns)} columns: {list(row)}")
        table.add_row(*row)
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()
