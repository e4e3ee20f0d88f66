"""Rectangles in pixel coordinates."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Rect"]


class Rect(NamedTuple):
    """A pixel rectangle: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.x + self.w

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.y + self.h

    def grow(self, left: int, top: int, right: int, bottom: int) -> Rect:
        """This rectangle with margins added on each side."""
        return Rect(self.x - left, self.y - top, self.w + left + right, self.h + top + bottom)

    def clip(self, width: int, height: int) -> Rect:
        """The part of this rectangle inside an image of the given size."""
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.right, width), min(self.bottom, height)
        return Rect(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))
