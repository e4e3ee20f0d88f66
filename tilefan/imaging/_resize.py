"""Tiling ``image.resize()``: libvips' own resize, reproduced one output tile at a time.

``vips_resize`` is separable: the horizontal mapping depends only on the image width, the vertical
one only on its height. How a tile equals the whole image depends on the part of libvips 8.18's
resize that produces it:

* The box pre-shrink (``shrinkh``/``shrinkv``, default ``gap``) and ``reducev``/``reduceh`` with
  a real kernel compute every output pixel from the image size alone, whichever region is asked
  for. Run on a full-size *canvas* holding the tile's source block at its true position (black
  elsewhere, never read), they give the whole image's pixels bit for bit.
* Other parts step a coordinate by repeated addition from the first pixel of each region they
  compute: ``vips_affine`` (upsizing) its input x, the ``nearest`` kernel's one-point
  ``reduceh``/``reducev`` their x and y, and ``reduceh``/``reducev`` on ``double`` pixels their x
  and y. libvips' own whole-image result then depends on the order it is computed in; tilefan
  pins it to libvips' strip order -- full-width strips ``STRIP_HEIGHT`` rows tall from the top --
  in `resize_whole` (what the ``resize`` step runs on a whole image), and per tile:

  - upsizing: the tile runs the same affine with an input offset ``idx`` chosen so that its first
    input x is exactly the sum libvips accumulates from column 0 to the tile's first column;
    every later x then follows by the same additions;
  - ``nearest``: it only copies pixels, so the row and column maps are read back from libvips by
    resizing coordinate ramps in strip order, and a tile is a selection from its block. The
    one-point reduce moves negative values of signed integer formats one step down
    (``v -> v - 1``) per pass; how many passes run is read back from libvips too;
  - ``double``: the canvas pipeline is computed in strip order itself, from column 0.

See docs/resize.md.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyvips

from tilefan.imaging.geometry import Rect

__all__ = [
    "KERNELS",
    "MAX_RESIZE_SCALE",
    "STRIP_HEIGHT",
    "Kernel",
    "resize_input_region",
    "resize_output_size",
    "resize_region",
    "resize_whole",
]

Kernel = Literal["nearest", "linear", "cubic", "mitchell", "lanczos2", "lanczos3"]

KERNELS: tuple[str, ...] = ("nearest", "linear", "cubic", "mitchell", "lanczos2", "lanczos3")

MAX_RESIZE_SCALE = 16.0
"""Largest scale factor on either axis."""

STRIP_HEIGHT = 16
"""The height of the full-width strips libvips computes a whole image in (its fat strip)."""

# vips_resize picks the affine interpolator from the kernel.
_INTERPOLATOR = {"nearest": "nearest", "linear": "bilinear"}
# The interpolators' window_offset; vips_affine moves its input coordinates by one more pixel.
_WINDOW_OFFSET = {"nearest": 0, "bilinear": 0, "bicubic": 1}
# Kernel support in (reduced) input pixels on each side, for the read margin.
_SUPPORT = {"nearest": 1, "linear": 1, "cubic": 2, "mitchell": 2, "lanczos2": 2, "lanczos3": 3}
# vips_resize's input displacement for upsizing: centre convention except for nearest.
_CENTRE = 0.5

_SIGNED_MIN = {"char": -(2**7), "short": -(2**15), "int": -(2**31)}
_DTYPE = {
    "uchar": np.uint8,
    "char": np.int8,
    "ushort": np.uint16,
    "short": np.int16,
    "uint": np.uint32,
    "int": np.int32,
    "float": np.float32,
    "double": np.float64,
}

# In these formats libvips' reduceh/reducev compute their coefficients from a coordinate stepped
# within each region (other formats use tables fixed per column and row).
_STEPPED_FORMATS = frozenset({"double"})

STRIP_CACHE_BYTES = 64 * 1024 * 1024
"""How much `resize_whole` may keep in computed strips for consumers that revisit them."""


@dataclass(frozen=True)
class _Axis:
    """How one axis is resized."""

    size: int
    """Input pixels along this axis."""
    out: int
    """Output pixels along this axis."""
    scale: float
    """libvips' scale after its at-least-one-pixel clamp."""

    @property
    def up(self) -> bool:
        """Whether this axis is enlarged (by ``vips_affine``)."""
        return self.scale > 1.0

    @property
    def down(self) -> bool:
        """Whether this axis is reduced (by ``shrink`` and ``reduce``)."""
        return self.scale < 1.0


@dataclass(frozen=True)
class _Geometry:
    """Everything a tile needs to know about one resize of one image size."""

    kernel: str
    h: _Axis
    v: _Axis

    @property
    def upsizes(self) -> bool:
        """Whether libvips runs an affine upsize after any reduce."""
        return self.h.up or self.v.up

    @property
    def interpolator(self) -> str:
        """The ``VipsInterpolate`` vips_resize uses for upsizing."""
        return _INTERPOLATOR.get(self.kernel, "bicubic")

    @property
    def matrix(self) -> tuple[float, float, float, float]:
        """The affine matrix vips_resize passes for upsizing."""
        if self.h.up and self.v.up:
            return (self.h.scale, 0.0, 0.0, self.v.scale)
        if self.h.up:
            return (self.h.scale, 0.0, 0.0, 1.0)
        return (1.0, 0.0, 0.0, self.v.scale)

    @property
    def ia(self) -> float:
        """The x step of libvips' inverse transform, computed as vips_affine computes it."""
        a, b, c, d = self.matrix
        det = a * d - b * c
        return (1.0 / det) * d

    @property
    def lead(self) -> float:
        """What vips_affine adds to the input x after the displacement: window offset + 1."""
        return float(_WINDOW_OFFSET[self.interpolator] + 1)


@functools.lru_cache(maxsize=256)
def _geometry(scale: float, vscale: float, kernel: str, width: int, height: int) -> _Geometry:
    probe = pyvips.Image.black(width, height).resize(scale, vscale=vscale, kernel=kernel)
    return _Geometry(
        kernel=kernel,
        h=_Axis(width, probe.width, max(scale, 1.0 / width)),
        v=_Axis(height, probe.height, max(vscale, 1.0 / height)),
    )


def resize_output_size(
    scale: float, vscale: float, kernel: str, width: int, height: int
) -> tuple[int, int]:
    """The size libvips gives ``image.resize(scale, vscale=vscale, kernel=kernel)``."""
    geometry = _geometry(scale, vscale, kernel, width, height)
    return geometry.h.out, geometry.v.out


def resize_whole(image: pyvips.Image, scale: float, vscale: float, kernel: str) -> pyvips.Image:
    """``image.resize(scale, vscale=vscale, kernel=kernel)``, computed in libvips' strip order.

    Where the result depends on evaluation order (the nearest kernel, upsizing, any kernel on
    ``double`` pixels), a cache of full-width strips makes every consumer -- a file writer,
    ``rot``, a blur asking for small tiles -- see the pixels of the strip order, which is what
    the tiles reproduce.
    """
    resized = image.resize(scale, vscale=vscale, kernel=kernel)
    geometry = _geometry(scale, vscale, kernel, image.width, image.height)
    order_free = kernel != "nearest" and not geometry.upsizes
    if order_free and image.format not in _STEPPED_FORMATS:
        return resized
    pixel = resized.bands * np.dtype(_DTYPE.get(resized.format, np.complex128)).itemsize
    strip = resized.width * STRIP_HEIGHT * pixel
    return resized.tilecache(
        tile_width=resized.width,
        tile_height=STRIP_HEIGHT,
        max_tiles=max(4, min(256, STRIP_CACHE_BYTES // strip)),
        threaded=True,
    )


# --- nearest: pixel selection ------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    """Which input column and row libvips copies to each output column and row."""

    columns: np.ndarray
    rows: np.ndarray
    signed_steps: int
    """How many times libvips' one-point reduce moved negative signed values down by one."""


@functools.lru_cache(maxsize=32)
def _selection(scale: float, vscale: float, width: int, height: int) -> _Selection:
    ramps = pyvips.Image.xyz(width, height)
    out = ramps.resize(scale, vscale=vscale, kernel="nearest")
    # libvips computes the whole image in full-width strips STRIP_HEIGHT rows tall, and its
    # nearest reduceh and reducev step their coordinate from the start of each region. So the
    # columns come from one full-width row, the rows from a column computed strip by strip.
    columns = np.frombuffer(pyvips.Region.new(out[0]).fetch(0, 0, out.width, 1), np.uint32)
    column = pyvips.Region.new(out[1])
    rows = np.concatenate(
        [
            np.frombuffer(column.fetch(0, top, 1, min(STRIP_HEIGHT, out.height - top)), np.uint32)
            for top in range(0, out.height, STRIP_HEIGHT)
        ]
    )
    minus_one = (pyvips.Image.black(width, height) - 1).cast("int")
    probe = minus_one.resize(scale, vscale=vscale, kernel="nearest").crop(0, 0, 1, 1)
    steps = -1 - int(probe.numpy().reshape(-1)[0])
    return _Selection(columns.astype(np.int64), rows.astype(np.int64), steps)


def _span(mapping: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The input range ``[first, last + 1)`` that output range ``[start, stop)`` copies from."""
    part = mapping[start:stop]
    return int(part.min()), int(part.max()) + 1


def _select(
    block: pyvips.Image, block_rect: Rect, out: Rect, selection: _Selection
) -> pyvips.Image:
    """Copy the selected pixels of ``block``, as libvips' nearest resize does."""
    rows = selection.rows[out.y : out.bottom] - block_rect.y
    columns = selection.columns[out.x : out.right] - block_rect.x
    pixels = np.ndarray(
        (block.height, block.width, block.bands),
        dtype=_DTYPE[block.format],
        buffer=block.write_to_memory(),
    )
    picked = pixels[rows][:, columns]
    lowest = _SIGNED_MIN.get(block.format)
    if lowest is not None and selection.signed_steps:
        moved = np.maximum(picked.astype(np.int64) - selection.signed_steps, lowest)
        picked = np.where(picked < 0, moved, picked).astype(picked.dtype)
    result = pyvips.Image.new_from_array(np.ascontiguousarray(picked))
    return result.copy(interpretation=block.interpretation, xres=block.xres, yres=block.yres)


# --- kernels: canvas and affine offset ---------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _accumulated_x(ia: float, start: float, count: int) -> np.ndarray:
    """libvips' input x for output columns 0..count-1 of a region starting at column 0.

    ``itertools.accumulate`` adds one step at a time in IEEE double, as the C loop does.
    """
    steps = itertools.accumulate(itertools.repeat(ia, max(count - 1, 0)), initial=start)
    return np.fromiter(steps, dtype=np.float64, count=count)


def _affine_idx(geometry: _Geometry, x0: int) -> float:
    """The ``idx`` that makes vips_affine start output column ``x0`` at the input x it reaches
    there when it starts from column 0 with ``idx = 0.5``, as it does on the whole image.

    At the left of a region vips_affine computes ``ix = (ia * x0 - idx) + lead``, then adds
    ``ia`` for each pixel; with the same start, every later x is the same too.
    """
    ia, lead = geometry.ia, geometry.lead
    target = float(_accumulated_x(ia, (0.0 - _CENTRE) + lead, geometry.h.out)[x0])
    start = ia * float(x0)
    guess = start - (target - lead)
    for direction in (math.inf, -math.inf):
        candidate = guess
        for _ in range(64):
            if (start - candidate) + lead == target:
                return candidate
            candidate = math.nextafter(candidate, direction)
    raise ArithmeticError(f"no input offset reproduces libvips' x at output column {x0}")


def _canvas(block: pyvips.Image, block_rect: Rect, width: int, height: int) -> pyvips.Image:
    """The block at its place in a full-size image; the rest is black and is never read."""
    if block_rect == Rect(0, 0, width, height):
        return block
    return block.embed(block_rect.x, block_rect.y, width, height)


def resize_region(
    block: pyvips.Image,
    block_rect: Rect,
    width: int,
    height: int,
    out: Rect,
    scale: float,
    vscale: float,
    kernel: str,
) -> pyvips.Image:
    """Output rectangle ``out`` of ``image.resize(scale, vscale=vscale, kernel=kernel)``, from
    ``block``, which covers ``block_rect`` (``resize_input_region`` clipped to the image)."""
    if kernel == "nearest":
        return _select(block, block_rect, out, _selection(scale, vscale, width, height))
    geometry = _geometry(scale, vscale, kernel, width, height)
    canvas = _canvas(block, block_rect, width, height)
    if block.format in _STEPPED_FORMATS:
        return _fetch_strips(canvas.resize(scale, vscale=vscale, kernel=kernel), out, block)
    if not geometry.upsizes:
        return _fetch(canvas.resize(scale, vscale=vscale, kernel=kernel), out, block)
    if geometry.h.down or geometry.v.down:
        canvas = canvas.resize(
            min(geometry.h.scale, 1.0), vscale=min(geometry.v.scale, 1.0), kernel=kernel
        )
    enlarged = canvas.affine(
        list(geometry.matrix),
        interpolate=pyvips.Interpolate.new(geometry.interpolator),
        oarea=[0, 0, geometry.h.out, geometry.v.out],
        idx=_affine_idx(geometry, out.x),
        idy=_CENTRE,
        extend="copy",
        premultiplied=True,
    )
    return _fetch(enlarged, out, block)


def _fetch_strips(image: pyvips.Image, rect: Rect, like: pyvips.Image) -> pyvips.Image:
    """Compute ``rect`` of ``image`` in libvips' strip order: strips ``STRIP_HEIGHT`` rows tall
    from the top, each from column 0, so every coordinate libvips steps within a region starts
    where it starts on the whole image. Costs the columns left of ``rect`` too, one strip at a
    time."""
    region = pyvips.Region.new(image)
    top = rect.y - rect.y % STRIP_HEIGHT
    dtype = _DTYPE[image.format]
    parts = []
    for y in range(top, rect.bottom, STRIP_HEIGHT):
        rows = min(STRIP_HEIGHT, image.height - y)
        strip = np.frombuffer(region.fetch(0, y, rect.right, rows), dtype)
        parts.append(strip.reshape(rows, rect.right, image.bands)[:, rect.x :])
    pixels = np.concatenate(parts)[rect.y - top : rect.y - top + rect.h]
    result = pyvips.Image.new_from_memory(
        np.ascontiguousarray(pixels).tobytes(), rect.w, rect.h, image.bands, image.format
    )
    return result.copy(interpretation=like.interpretation, xres=like.xres, yres=like.yres)


def _fetch(image: pyvips.Image, rect: Rect, like: pyvips.Image) -> pyvips.Image:
    """Compute ``rect`` of ``image`` as one region, so affine steps x from ``rect.x`` on every
    row, and return it as a memory image with the metadata of ``like``."""
    pixels = pyvips.Region.new(image).fetch(*rect)
    result = pyvips.Image.new_from_memory(pixels, rect.w, rect.h, image.bands, image.format)
    return result.copy(interpretation=like.interpretation, xres=like.xres, yres=like.yres)


# --- the input rectangle -----------------------------------------------------------------------


def _kernel_span(axis: _Axis, kernel: str, start: int, stop: int, affine: bool) -> tuple[int, int]:
    """A safe input range for output range ``[start, stop)`` along one axis."""
    ratio = axis.size / axis.out
    if axis.down:
        # shrink by k (ceil) then reduce by ratio / k with a kernel of this support.
        k = max(1, math.floor(ratio / 2.0))
        margin = math.ceil((_SUPPORT[kernel] + 1) * ratio) + 2 * k + 4
    elif axis.up or affine:
        # Interpolators read at most 2 pixels either side; 3 covers rounding of the step.
        margin = 3
    else:
        margin = 0
    return math.floor(start * ratio) - margin, math.ceil(stop * ratio) + margin


def resize_input_region(
    out: Rect, width: int, height: int, scale: float, vscale: float, kernel: str
) -> Rect:
    """The input rectangle a resize needs for output rectangle ``out`` (may pass the edges)."""
    if kernel == "nearest":
        selection = _selection(scale, vscale, width, height)
        x0, x1 = _span(selection.columns, out.x, out.right)
        y0, y1 = _span(selection.rows, out.y, out.bottom)
    else:
        geometry = _geometry(scale, vscale, kernel, width, height)
        x0, x1 = _kernel_span(geometry.h, kernel, out.x, out.right, geometry.upsizes)
        y0, y1 = _kernel_span(geometry.v, kernel, out.y, out.bottom, geometry.upsizes)
    return Rect(x0, y0, x1 - x0, y1 - y0)
