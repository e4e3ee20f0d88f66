"""Operation chains: validated libvips steps that know how to run on one tile.

A step is written as libvips names it: ``{"op": "gaussblur", "sigma": 4}`` means
``image.gaussblur(4)``. Each step declares its kind, its halo and how it moves pixels, so the
planner can work out which source pixels every output tile needs.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pyvips
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import ErrorDetails

from tilefan.errors import InvalidChain
from tilefan.imaging._resize import (
    MAX_RESIZE_SCALE,
    Kernel,
    resize_input_region,
    resize_output_size,
    resize_region,
    resize_whole,
)
from tilefan.imaging.geometry import Rect
from tilefan.imaging.statistics import Statistics

__all__ = [
    "MAX_BANDS",
    "MAX_CONV_MASK",
    "MAX_HALO",
    "Chain",
    "GlobalOperation",
    "OpKind",
    "Operation",
    "Step",
    "chain_halo",
    "operation_names",
    "parse_chain",
]

MAX_BANDS = 64
"""Most bands an image may have at any step: a multispectral image's, not thousands (a linear
with 20,000 coefficients made a 20,000-band image that took 1.2 GB before failing)."""

MAX_CONV_MASK = 15
"""Largest user convolution mask, in pixels along each side."""

MAX_HALO = 256
"""Largest halo a single step may need; it bounds how far one tile reads past its edges."""


class OpKind(enum.StrEnum):
    """How a step touches pixels, which decides how it is tiled."""

    POINT = "point"
    NEIGHBOURHOOD = "neighbourhood"
    GEOMETRIC = "geometric"
    GLOBAL = "global"


def _extend(block: pyvips.Image, block_rect: Rect, needed: Rect) -> pyvips.Image:
    """Grow ``block`` to cover ``needed`` by copying edge pixels, as libvips does at image edges.

    ``block_rect`` is ``needed`` clipped to the image, so whatever is missing lies outside the
    image, where libvips would see copies of the edge.
    """
    if block_rect == needed:
        return block
    return block.embed(
        block_rect.x - needed.x, block_rect.y - needed.y, needed.w, needed.h, extend="copy"
    )


class Operation(BaseModel):
    """One step of a chain. Subclasses are the supported libvips operations."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    kind: ClassVar[OpKind]

    def halo(self) -> int:
        """Pixels of context needed on each side of an output pixel."""
        return 0

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of this step's output for an input of the given size."""
        return width, height

    def input_region(self, out: Rect, width: int, height: int) -> Rect:
        """The input rectangle needed to compute ``out`` (may reach past the input's edges)."""
        h = self.halo()
        return out.grow(h, h, h, h)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        """Run the step on a whole image, exactly as libvips would."""
        raise NotImplementedError

    def apply_region(
        self, block: pyvips.Image, block_rect: Rect, width: int, height: int, out: Rect
    ) -> pyvips.Image:
        """Compute the output rectangle ``out`` from ``block``, which covers ``block_rect``.

        ``block_rect`` is ``input_region(out)`` clipped to the ``width`` x ``height`` input.
        """
        needed = self.input_region(out, width, height)
        result = self.apply(_extend(block, block_rect, needed))
        dx, dy = self._result_offset(out, needed)
        if (dx, dy, result.width, result.height) == (0, 0, out.w, out.h):
            return result
        return result.crop(dx, dy, out.w, out.h)

    def _result_offset(self, out: Rect, needed: Rect) -> tuple[int, int]:
        """Where ``out`` starts in the result of applying this step to ``needed``."""
        return out.x - needed.x, out.y - needed.y


class _Point(Operation):
    kind: ClassVar[OpKind] = OpKind.POINT


class _Neighbourhood(Operation):
    kind: ClassVar[OpKind] = OpKind.NEIGHBOURHOOD


class _Geometric(Operation):
    kind: ClassVar[OpKind] = OpKind.GEOMETRIC


class GlobalOperation(Operation):
    """A step that needs values of the whole image it gets, found by a statistics pass.

    `apply` is libvips' whole-image call; `bind` turns the step, given the statistics of the
    whole image it gets, into a point step that tiles.
    """

    kind: ClassVar[OpKind] = OpKind.GLOBAL

    def needs_histogram(self) -> bool:
        """Whether the statistics pass must find the histogram, not only min, max and sums."""
        return False

    def bind(self, statistics: Statistics) -> Operation:
        """This step with its whole-image values: a point step that runs on any tile."""
        raise NotImplementedError


# --- point operations -------------------------------------------------------------------------


class Invert(_Point):
    """``image.invert()``: photographic negative."""

    op: Literal["invert"]

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.invert()


class Linear(_Point):
    """``image.linear(a, b)``: ``a * pixel + b`` per band; float output unless ``uchar``."""

    op: Literal["linear"]
    a: float | list[float] = 1.0
    b: float | list[float] = 0.0
    uchar: bool = False

    @model_validator(mode="after")
    def _few_bands(self) -> Linear:
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) > MAX_BANDS:
                raise ValueError(
                    f"{name} has {len(value):,} coefficients, one per output band; "
                    f"at most {MAX_BANDS} are allowed"
                )
        return self

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.linear(self.a, self.b, uchar=self.uchar)


class Gamma(_Point):
    """``image.gamma(exponent=...)``: gamma correction over the format's range."""

    op: Literal["gamma"]
    exponent: float = Field(default=1.0 / 2.4, gt=0, le=100)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.gamma(exponent=self.exponent)


class Colourspace(_Point):
    """``image.colourspace(space)``: convert between interpretations."""

    op: Literal["colourspace"]
    space: Literal["b-w", "srgb", "grey16", "rgb16", "scrgb", "lab", "xyz", "hsv", "cmyk"]

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.colourspace(self.space)


class Flatten(_Point):
    """``image.flatten(background=...)``: remove alpha against a background colour."""

    op: Literal["flatten"]
    background: list[float] = Field(default_factory=lambda: [0.0], min_length=1, max_length=4)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.flatten(background=self.background)


class Threshold(_Point):
    """``image >= value``: 255 where a band reaches ``value``, else 0 (uchar)."""

    op: Literal["threshold"]
    value: float

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image >= self.value


# --- neighbourhood operations -----------------------------------------------------------------

_Precision = Literal["integer", "float"]


@functools.lru_cache(maxsize=256)
def _gauss_radius(sigma: float, min_ampl: float, precision: str) -> int:
    """Half the width of the mask libvips builds for these parameters."""
    mask = pyvips.Image.gaussmat(sigma, min_ampl, separable=True, precision=precision)
    return int(mask.width) // 2


class GaussBlur(_Neighbourhood):
    """``image.gaussblur(sigma, min_ampl=..., precision=...)``."""

    op: Literal["gaussblur"]
    sigma: float = Field(ge=0.01, le=100)
    min_ampl: float = Field(default=0.2, ge=0.001, lt=1)
    precision: _Precision = "integer"

    @model_validator(mode="after")
    def _halo_fits(self) -> GaussBlur:
        if self.halo() > MAX_HALO:
            raise ValueError(f"the mask for these parameters is wider than 2 x {MAX_HALO} pixels")
        return self

    def halo(self) -> int:
        return _gauss_radius(self.sigma, self.min_ampl, self.precision)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.gaussblur(self.sigma, min_ampl=self.min_ampl, precision=self.precision)


class Sharpen(_Neighbourhood):
    """``image.sharpen(sigma=..., x1=..., y2=..., y3=..., m1=..., m2=...)``: unsharp mask on L."""

    op: Literal["sharpen"]
    sigma: float = Field(default=0.5, ge=0.01, le=100)
    x1: float = Field(default=2.0, ge=0, le=1_000_000)
    y2: float = Field(default=10.0, ge=0, le=1_000_000)
    y3: float = Field(default=20.0, ge=0, le=1_000_000)
    m1: float = Field(default=0.0, ge=0, le=1_000_000)
    m2: float = Field(default=3.0, ge=0, le=1_000_000)

    def halo(self) -> int:
        # libvips 8.18's sharpen blurs L with an integer gaussian cut at 0.1 of its peak (older
        # releases cut at 0.2); the halo-tightness test fails if a release changes it again.
        return _gauss_radius(self.sigma, 0.1, "integer")

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.sharpen(
            sigma=self.sigma, x1=self.x1, y2=self.y2, y3=self.y3, m1=self.m1, m2=self.m2
        )


class Median(_Neighbourhood):
    """``image.median(size)``: median over a ``size`` x ``size`` window."""

    op: Literal["median"]
    size: int = Field(default=3, ge=1, le=2 * MAX_HALO + 1)

    def halo(self) -> int:
        return self.size // 2

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.median(self.size)


class Sobel(_Neighbourhood):
    """``image.sobel()``: Sobel edge magnitude."""

    op: Literal["sobel"]

    def halo(self) -> int:
        return 1

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.sobel()


class Conv(_Neighbourhood):
    """``image.conv(mask, precision=...)`` with a user mask of up to 15 x 15."""

    op: Literal["conv"]
    mask: list[list[float]] = Field(min_length=1, max_length=MAX_CONV_MASK)
    scale: float = 1.0
    offset: float = 0.0
    precision: _Precision = "float"

    @model_validator(mode="after")
    def _mask_is_rectangular(self) -> Conv:
        widths = {len(row) for row in self.mask}
        if len(widths) != 1:
            raise ValueError("mask rows must all have the same length")
        (width,) = widths
        if not 1 <= width <= MAX_CONV_MASK:
            raise ValueError(f"mask rows must have 1 to {MAX_CONV_MASK} values")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self

    def halo(self) -> int:
        return max(len(self.mask), len(self.mask[0])) // 2

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        mask = pyvips.Image.new_from_array(self.mask, scale=self.scale, offset=self.offset)
        return image.conv(mask, precision=self.precision)


def _mirror(block: pyvips.Image, block_rect: Rect, needed: Rect) -> pyvips.Image:
    """Grow ``block`` to ``needed`` by mirroring at the image edges, as ``hist_local`` does.

    libvips mirrors the whole image; ``block`` reaches the image edge wherever ``needed`` passes
    it, and is wider than the mirrored margin, so mirroring the block gives the same pixels.
    """
    if block_rect == needed:
        return block
    return block.embed(
        block_rect.x - needed.x, block_rect.y - needed.y, needed.w, needed.h, extend="mirror"
    )


class HistLocal(_Neighbourhood):
    """``image.hist_local(width, height, max_slope=...)``: local histogram equalisation (uchar).

    Each output pixel equalises over the ``width`` x ``height`` window starting ``width // 2``
    left and ``height // 2`` above it; libvips mirrors the image at its edges to fill windows.
    """

    op: Literal["hist_local"]
    width: int = Field(ge=1, le=2 * MAX_HALO + 1)
    height: int = Field(ge=1, le=2 * MAX_HALO + 1)
    max_slope: int = Field(default=0, ge=0, le=100)

    def halo(self) -> int:
        return max(self.width, self.height) // 2

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.hist_local(self.width, self.height, max_slope=self.max_slope)

    def apply_region(
        self, block: pyvips.Image, block_rect: Rect, width: int, height: int, out: Rect
    ) -> pyvips.Image:
        needed = self.input_region(out, width, height)
        result = self.apply(_mirror(block, block_rect, needed))
        dx, dy = self._result_offset(out, needed)
        return result.crop(dx, dy, out.w, out.h)


# --- whole-image operations -------------------------------------------------------------------


class HistEqual(GlobalOperation):
    """``image.hist_equal(band=...)``: histogram equalisation over the whole image.

    libvips maps the image through ``hist_find`` -> ``hist_cum`` -> ``hist_norm``, cast back to
    the image's format; the histogram here is the sum of the tiles' histograms.
    """

    op: Literal["hist_equal"]
    band: int | None = Field(default=None, ge=0, le=100_000)

    def needs_histogram(self) -> bool:
        return True

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.hist_equal() if self.band is None else image.hist_equal(band=self.band)

    def bind(self, statistics: Statistics) -> Operation:
        histogram = statistics.histogram_image(self.band)
        lut = histogram.hist_cum().hist_norm().cast(statistics.pixel_format).copy_memory()
        return MapLut(op="maplut", lut=lut)


class MapLut(_Point):
    """``image.maplut(lut)``: a bound `HistEqual`; never written in a chain."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    op: Literal["maplut"]
    lut: pyvips.Image

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.maplut(self.lut)


class Scale(GlobalOperation):
    """``image.scale(exp=..., log=...)``: scale to uchar from the image's own min and max."""

    op: Literal["scale"]
    exp: float = Field(default=0.25, ge=0.00001, le=10000)
    log: bool = False

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        # Through the operation by name: on an image, ``scale`` is the header field.
        result: pyvips.Image = pyvips.Operation.call("scale", image, exp=self.exp, log=self.log)
        return result

    def bind(self, statistics: Statistics) -> Operation:
        # libvips takes the min and max over all bands.
        return ScaleFrom(
            op="scale_from",
            exp=self.exp,
            log=self.log,
            minimum=float(statistics.minimum.min()),
            maximum=float(statistics.maximum.max()),
        )


class ScaleFrom(_Point):
    """A bound `Scale`: libvips' ``vips_scale`` arithmetic from a given min and max."""

    op: Literal["scale_from"]
    exp: float
    log: bool
    minimum: float
    maximum: float

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        mn, mx = self.minimum, self.maximum
        if mn == mx:
            return pyvips.Image.black(image.width, image.height, bands=image.bands)
        if self.log:
            # C's arithmetic, as libvips': a negative maximum makes NaN (every pixel 255), not
            # an error.
            with np.errstate(invalid="ignore", divide="ignore"):
                f = float(255.0 / np.log10(1.0 + np.power(mx, self.exp)))
            powered = image.math2_const("pow", [self.exp])
            return powered.linear(1.0, 1.0).log10().linear(f, 0.5, uchar=True)
        f = 255.0 / (mx - mn)
        # libvips adds 0.5 to round to nearest.
        return image.linear(f, -(mn * f) + 0.5, uchar=True)


# --- geometric operations ---------------------------------------------------------------------


class Rot(_Geometric):
    """``image.rot(angle)``: rotate clockwise by a multiple of 90 degrees."""

    op: Literal["rot"]
    angle: Literal["d90", "d180", "d270"]

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return (width, height) if self.angle == "d180" else (height, width)

    def input_region(self, out: Rect, width: int, height: int) -> Rect:
        if self.angle == "d90":
            return Rect(out.y, height - out.right, out.h, out.w)
        if self.angle == "d180":
            return Rect(width - out.right, height - out.bottom, out.w, out.h)
        return Rect(width - out.bottom, out.x, out.h, out.w)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.rot(self.angle)

    def _result_offset(self, out: Rect, needed: Rect) -> tuple[int, int]:
        return 0, 0


class Flip(_Geometric):
    """``image.flip(direction)``: mirror left-right or top-bottom."""

    op: Literal["flip"]
    direction: Literal["horizontal", "vertical"]

    def input_region(self, out: Rect, width: int, height: int) -> Rect:
        if self.direction == "horizontal":
            return Rect(width - out.right, out.y, out.w, out.h)
        return Rect(out.x, height - out.bottom, out.w, out.h)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.flip(self.direction)

    def _result_offset(self, out: Rect, needed: Rect) -> tuple[int, int]:
        return 0, 0


class Shrink(_Geometric):
    """``image.shrink(hshrink, vshrink)``: integer box-filter shrink."""

    op: Literal["shrink"]
    hshrink: int = Field(ge=1, le=1024)
    vshrink: int = Field(ge=1, le=1024)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        # libvips rounds to the nearest whole pixel; zero is an error the planner reports.
        return int(width / self.hshrink + 0.5), int(height / self.vshrink + 0.5)

    def input_region(self, out: Rect, width: int, height: int) -> Rect:
        return Rect(
            out.x * self.hshrink, out.y * self.vshrink, out.w * self.hshrink, out.h * self.vshrink
        )

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        return image.shrink(self.hshrink, self.vshrink)

    def _result_offset(self, out: Rect, needed: Rect) -> tuple[int, int]:
        return 0, 0


class Resize(_Geometric):
    """``image.resize(scale, vscale=..., kernel=...)``: libvips' own resize, tile by tile.

    Sizes, the box pre-shrink, the reduce and the upsizing affine are libvips' own; the tiles
    equal the whole-image result, computed in libvips' strip order, bit for bit (see
    ``tilefan.imaging._resize`` and docs/resize.md).
    """

    op: Literal["resize"]
    scale: float = Field(gt=0, le=MAX_RESIZE_SCALE)
    vscale: float | None = Field(default=None, gt=0, le=MAX_RESIZE_SCALE)
    kernel: Kernel = "lanczos3"

    def _vscale(self) -> float:
        return self.scale if self.vscale is None else self.vscale

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        # libvips never shrinks an axis below one pixel.
        return resize_output_size(self.scale, self._vscale(), self.kernel, width, height)

    def input_region(self, out: Rect, width: int, height: int) -> Rect:
        return resize_input_region(out, width, height, self.scale, self._vscale(), self.kernel)

    def apply(self, image: pyvips.Image) -> pyvips.Image:
        # In libvips' strip order: nearest, upsizing and double pixels depend on the order.
        return resize_whole(image, self.scale, self._vscale(), self.kernel)

    def apply_region(
        self, block: pyvips.Image, block_rect: Rect, width: int, height: int, out: Rect
    ) -> pyvips.Image:
        return resize_region(
            block, block_rect, width, height, out, self.scale, self._vscale(), self.kernel
        )


# One step of a chain: the operations, told apart by their "op" field.
Step = Annotated[
    Invert
    | Linear
    | Gamma
    | Colourspace
    | Flatten
    | Threshold
    | GaussBlur
    | Sharpen
    | Median
    | Sobel
    | Conv
    | HistLocal
    | HistEqual
    | Scale
    | Rot
    | Flip
    | Shrink
    | Resize,
    Field(discriminator="op"),
]

_CHAIN_ADAPTER: TypeAdapter[list[Operation]] = TypeAdapter(list[Step])  # type: ignore[arg-type]

MAX_CHAIN_LENGTH = 32


@functools.cache
def operation_names() -> tuple[str, ...]:
    """The names of every supported operation, as written in a chain (computed once)."""
    return tuple(sorted(_CHAIN_ADAPTER.json_schema()["items"]["discriminator"]["mapping"]))


class Chain(tuple[Operation, ...]):
    """A validated operation chain."""

    def to_json(self) -> list[dict[str, Any]]:
        """The chain as JSON-ready steps, defaults filled in."""
        return [step.model_dump(mode="json") for step in self]

    def halo(self) -> int:
        """The sum of the steps' halos: how far a tile reads past its edges (before scaling)."""
        return chain_halo(self)

    def has_global(self) -> bool:
        """Whether a statistics pass over the whole image must run before the tiles."""
        return any(step.kind is OpKind.GLOBAL for step in self)

    def global_steps(self) -> list[tuple[int, GlobalOperation]]:
        """The steps that need a statistics pass, with their indexes, in chain order."""
        return [
            (index, step) for index, step in enumerate(self) if isinstance(step, GlobalOperation)
        ]

    def bind(self, statistics: dict[int, Statistics]) -> Chain:
        """This chain with each global step bound to the statistics of the image it gets.

        ``statistics`` maps a global step's index to the statistics of its input; steps not
        in it stay as they are.
        """
        return Chain(
            step.bind(statistics[index])
            if isinstance(step, GlobalOperation) and index in statistics
            else step
            for index, step in enumerate(self)
        )


def chain_halo(steps: Sequence[Operation]) -> int:
    """The sum of the halos of ``steps``."""
    return sum(step.halo() for step in steps)


def _describe(error: ErrorDetails) -> str:
    """One line for a pydantic error: the step index, its operation and the field."""
    index, *rest = error["loc"]
    # The discriminated union puts the operation name after the index; the field follows it.
    where = f"step {index}" + (f" ({rest[0]})" if rest else "")
    if len(rest) > 1:
        where += ", field '" + ".".join(str(part) for part in rest[1:]) + "'"
    return f"{where}: {error['msg']}"


def parse_chain(steps: Any) -> Chain:
    """Validate a JSON chain, raising `InvalidChain` with one line per problem."""
    if isinstance(steps, Chain):
        return steps
    if not isinstance(steps, list):
        raise InvalidChain('operations must be a list of steps like {"op": "invert"}')
    if len(steps) > MAX_CHAIN_LENGTH:
        raise InvalidChain(f"operations: at most {MAX_CHAIN_LENGTH} steps are allowed")
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or "op" not in step:
            raise InvalidChain(f"step {index}: each step must be an object with an 'op' field")
        if step["op"] not in operation_names():
            raise InvalidChain(
                f"step {index}, field 'op': unknown operation {step['op']!r}; "
                f"valid operations are {', '.join(operation_names())}"
            )
    try:
        return Chain(_CHAIN_ADAPTER.validate_python(steps))
    except ValidationError as e:
        raise InvalidChain("; ".join(_describe(err) for err in e.errors())) from e
