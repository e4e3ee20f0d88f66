"""The tile grid drawn as SVG: one cell per tile, coloured by its state."""

from __future__ import annotations

from xml.sax.saxutils import escape

from tilefan.state.jobs import TileState

__all__ = ["COLOURS", "render_progress_svg"]

COLOURS = {
    TileState.PENDING.letter: "#d0d4da",
    TileState.RUNNING.letter: "#f2b33d",
    TileState.DONE.letter: "#2e9e5b",
    TileState.FAILED.letter: "#d64541",
}

_MAX_WIDTH = 1200
"""Cells shrink so the picture stays at most this wide, but never below one pixel."""


def render_progress_svg(grid: str, columns: int, title: str) -> str:
    """An SVG of ``grid`` (row-major state letters) laid out ``columns`` cells wide."""
    columns = max(columns, 1)
    rows = max(1, -(-len(grid) // columns))
    cell = max(1, min(24, _MAX_WIDTH // columns))
    width, height = columns * cell, rows * cell
    gap = 1 if cell >= 4 else 0
    cells = [
        f'<rect x="{(i % columns) * cell}" y="{(i // columns) * cell}" '
        f'width="{cell - gap}" height="{cell - gap}" fill="{COLOURS.get(letter, "#000")}"/>'
        for i, letter in enumerate(grid)
    ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>' + "".join(cells) + "</svg>"
    )
