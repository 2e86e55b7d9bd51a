"""Printing result tables and appending them to ``bench/RESULTS.md``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"
"""Where measured rows are kept; every run appends, nothing is rewritten."""

RESULTS_HEADER = """# Benchmark results

Rows are appended by `bench/train.py` and `bench/generate.py` (see `make bench`); each block
names its device, date, library versions and settings. Only measured figures go here.
"""

Row = dict[str, object]


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """A Markdown table of ``rows`` (dicts keyed by column name), readable as plain text too."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), separator, *(line(r) for r in cells)])


def append_results(
    title: str,
    context: Sequence[str],
    columns: Sequence[str],
    rows: Sequence[Row],
    notes: Sequence[str] = (),
    path: Path = RESULTS_FILE,
) -> None:
    """Append one block (heading, context bullets, table, notes) to the results file."""
    if not path.exists():
        path.write_text(RESULTS_HEADER, encoding="utf-8")
    block = [f"\n## {title}\n"]
    block += [f"- {line}" for line in context]
    block += ["", format_table(columns, rows), ""]
    block += [f"{note}  " for note in notes]
    with path.open("a", encoding="utf-8") as results:
        results.write("\n".join(block).rstrip() + "\n")
