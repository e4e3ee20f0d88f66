"""Whole-image statistics from tiles: partial statistics per tile, combined as libvips would.

A tile's partial is libvips' own ``stats`` of its pixels (minimum, maximum, sums and where the
extremes lie) and, where a step needs it, its ``hist_find`` histogram. Partials combine exactly:
extremes by comparison, histograms by adding counts; only the sums differ from libvips' by the
order of their additions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyvips

__all__ = ["HISTOGRAM_FORMATS", "Statistics", "histogram_bins"]

# Columns of the matrix libvips' stats returns.
_MIN, _MAX, _SUM, _SUM2, _XMIN, _YMIN, _XMAX, _YMAX = 0, 1, 2, 3, 6, 7, 8, 9

LARGE_HISTOGRAM = 1 << 32
"""From this many pixels on, libvips' ``hist_find`` counts in doubles rather than uints."""

HISTOGRAM_FORMATS = frozenset({"uchar", "ushort"})
"""Formats whose histogram the ``stats`` output includes: there the pixel values are the bins."""


def histogram_bins(pixel_format: str) -> int:
    """How many bins ``hist_find`` can fill: it casts char to uchar, and all but uchar to ushort."""
    return 256 if pixel_format in ("uchar", "char") else 65536


@dataclass(frozen=True)
class Statistics:
    """Statistics of an image, or of one of its tiles, per band.

    ``positions`` holds ``(x_min, y_min, x_max, y_max)`` per band in image coordinates;
    ``histogram`` is ``bins`` x ``bands`` counts (``hist_find`` of every band), or None.
    """

    pixels: int
    pixel_format: str
    minimum: npt.NDArray[np.float64]
    maximum: npt.NDArray[np.float64]
    sums: npt.NDArray[np.float64]
    squares: npt.NDArray[np.float64]
    positions: npt.NDArray[np.int64]
    histogram: npt.NDArray[np.uint64] | None

    @property
    def bands(self) -> int:
        """How many bands the image has."""
        return len(self.minimum)

    @classmethod
    def of_tile(cls, tile: pyvips.Image, x: int, y: int, *, histogram: bool) -> Statistics:
        """The partial statistics of ``tile``, which lies at ``x``, ``y`` in the image."""
        matrix = np.array(tile.stats().tolist(), dtype=np.float64)[1:]
        offset = np.array([x, y, x, y], dtype=np.int64)
        positions = matrix[:, [_XMIN, _YMIN, _XMAX, _YMAX]].astype(np.int64) + offset
        counts = None
        if histogram:
            found = np.asarray(tile.hist_find().numpy(), dtype=np.uint64).reshape(-1, tile.bands)
            counts = np.zeros((histogram_bins(tile.format), tile.bands), dtype=np.uint64)
            counts[: len(found)] = found
        return cls(
            pixels=tile.width * tile.height,
            pixel_format=tile.format,
            minimum=matrix[:, _MIN],
            maximum=matrix[:, _MAX],
            sums=matrix[:, _SUM],
            squares=matrix[:, _SUM2],
            positions=positions,
            histogram=counts,
        )

    @classmethod
    def combine(cls, parts: Sequence[Statistics]) -> Statistics:
        """The statistics of the image the ``parts`` tile, in that order.

        Where several pixels share the extreme value, the first part's position wins, as
        libvips keeps the first extreme it meets.
        """
        first, *rest = parts
        minimum, maximum = first.minimum.copy(), first.maximum.copy()
        positions = first.positions.copy()
        for part in rest:
            lower = part.minimum < minimum
            minimum[lower] = part.minimum[lower]
            positions[lower, :2] = part.positions[lower, :2]
            higher = part.maximum > maximum
            maximum[higher] = part.maximum[higher]
            positions[higher, 2:] = part.positions[higher, 2:]
        histogram = None
        if first.histogram is not None:
            histogram = np.zeros_like(first.histogram)
            for part in parts:
                if part.histogram is None:
                    raise ValueError("every part must have a histogram, or none")
                histogram += part.histogram
        return cls(
            pixels=sum(part.pixels for part in parts),
            pixel_format=first.pixel_format,
            minimum=minimum,
            maximum=maximum,
            sums=np.sum([part.sums for part in parts], axis=0),
            squares=np.sum([part.squares for part in parts], axis=0),
            positions=positions,
            histogram=histogram,
        )

    def histogram_image(self, band: int | None = None) -> pyvips.Image:
        """What libvips' ``hist_find(band=band)`` gives on the whole image.

        ``hist_find`` is as wide as the largest value it met, except that all bands of a uchar
        image always get 256 bins; from 2^32 pixels on it counts in doubles.
        """
        if self.histogram is None:
            raise ValueError("these statistics were taken without a histogram")
        counts = self.histogram if band is None else self.histogram[:, band : band + 1]
        if band is None and histogram_bins(self.pixel_format) == 256:
            width = 256
        else:
            filled = np.flatnonzero(counts.any(axis=1))
            width = int(filled[-1]) + 1 if len(filled) else 1
        dtype = np.float64 if self.pixels >= LARGE_HISTOGRAM else np.uint32
        image = pyvips.Image.new_from_array(counts[:width].astype(dtype).reshape(1, width, -1))
        return image.copy(interpretation="histogram")

    def document(self) -> dict[str, Any]:
        """libvips' ``stats`` per band and over all bands, and the histogram for uchar/ushort."""
        bands = [self._row(band) for band in range(self.bands)]
        everything = dict(bands[0])
        for row in bands[1:]:
            if row["min"] < everything["min"]:
                everything.update({k: row[k] for k in ("min", "x_min", "y_min")})
            if row["max"] > everything["max"]:
                everything.update({k: row[k] for k in ("max", "x_max", "y_max")})
        everything["sum"] = float(np.sum(self.sums))
        everything["sum2"] = float(np.sum(self.squares))
        everything.update(_moments(everything["sum"], everything["sum2"], self.pixels * self.bands))
        document: dict[str, Any] = {
            "pixels": self.pixels,
            "bands": self.bands,
            "format": self.pixel_format,
            "all": everything,
            "per_band": bands,
        }
        if self.pixel_format in HISTOGRAM_FORMATS:
            found = self.histogram_image().numpy().reshape(-1, self.bands)
            document["histogram"] = found.T.astype(np.uint64).tolist()
        return document

    def _row(self, band: int) -> dict[str, Any]:
        x_min, y_min, x_max, y_max = (int(v) for v in self.positions[band])
        total, squares = float(self.sums[band]), float(self.squares[band])
        return {
            "min": float(self.minimum[band]),
            "max": float(self.maximum[band]),
            "sum": total,
            "sum2": squares,
            **_moments(total, squares, self.pixels),
            "x_min": x_min,
            "y_min": y_min,
            "x_max": x_max,
            "y_max": y_max,
        }

    def to_bytes(self) -> bytes:
        """A compact binary form (numpy's npz), for storing partials and results."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {
            "pixels": np.array(self.pixels, dtype=np.int64),
            "pixel_format": np.array(self.pixel_format),
            "minimum": self.minimum,
            "maximum": self.maximum,
            "sums": self.sums,
            "squares": self.squares,
            "positions": self.positions,
        }
        if self.histogram is not None:
            arrays["histogram"] = self.histogram
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Statistics:
        """Inverse of `to_bytes`."""
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(
                pixels=int(arrays["pixels"]),
                pixel_format=str(arrays["pixel_format"]),
                minimum=arrays["minimum"],
                maximum=arrays["maximum"],
                sums=arrays["sums"],
                squares=arrays["squares"],
                positions=arrays["positions"],
                histogram=arrays.get("histogram"),
            )


def _moments(total: float, squares: float, count: int) -> dict[str, float]:
    """Mean and standard deviation from sums, with libvips' formula."""
    deviation = math.sqrt(abs(squares - total * total / count) / (count - 1)) if count > 1 else 0.0
    return {"mean": total / count, "deviation": deviation}
