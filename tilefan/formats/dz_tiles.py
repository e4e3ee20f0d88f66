"""DeepZoom and IIIF tile sets: the pyramid, tile and name arithmetic of libvips' ``dzsave``.

Read from libvips 8.18's ``dzsave.c``: each level is the one above halved, its size rounded
up (a 5 px side becomes 3), after an odd last column or row is padded with a copy of itself;
a 2x2 is averaged as ``tiffsave``'s pyramid does (`halve`). DeepZoom goes down to 1x1, IIIF to
the first level that fits one tile. A DeepZoom tile is its ``tile_size`` square grown by
``overlap`` on each side, clipped to its level. With the default JPEG tiles ("direct" mode)
libvips first makes the image saveable as 8-bit (an alpha channel is flattened on white) and
shrinks that; with another suffix it shrinks the pixels as they are and converts each tile
when it encodes it. `TileSetLayout.dzsave_arguments` is the ``dzsave`` call a tile set equals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyvips

from tilefan.errors import TilefanError
from tilefan.formats.tiff_tiles import halve
from tilefan.imaging.geometry import Rect

__all__ = [
    "IIIF_ID_PATTERN",
    "TILESET_FORMATS",
    "InvalidTileSet",
    "TileSetLayout",
    "halve_padded",
]

TILESET_FORMATS = frozenset({"dz", "dzi", "iiif"})
"""Output formats written as a pyramid of tiles: a DeepZoom zip, a DeepZoom set, IIIF."""

_SUFFIXES = ("jpeg", "png", "webp")
_IIIF_ID = "https://example.com/iiif"
"""libvips' default IIIF id; the ``id`` of a set is this followed by ``/`` and its name."""

IIIF_ID_PATTERN = r"^https?://[!#-\[\]-~]*[!#-.0-\[\]-~]$"
"""An IIIF id tilefan writes as libvips does: printable ASCII without a space, a quote or a
backslash (which JSON would escape and libvips does not), not ending in ``/``."""


class InvalidTileSet(TilefanError):
    """The tile set's options, or the result's pixels, cannot make the asked tile set."""

    code = "INVALID_TILE_SET"


@dataclass(frozen=True)
class TileSetLayout:
    """A tile set's layout and encoding: what ``dzsave`` is asked for."""

    iiif: bool = False
    tile_size: int = 254
    overlap: int = 1
    suffix: str = "jpeg"
    quality: int = 75
    iiif_id: str = _IIIF_ID
    """Where an IIIF set is served from: its ``info.json`` id is this, ``/``, and its name."""

    @classmethod
    def from_options(cls, output_format: str, options: Mapping[str, Any]) -> TileSetLayout:
        """The layout a job's format and output options ask for, dzsave's defaults elsewhere."""
        iiif = output_format == "iiif"
        overlap = options.get("overlap")
        layout = cls(
            iiif=iiif,
            tile_size=int(options.get("tile_size") or (512 if iiif else 254)),
            overlap=(0 if iiif else 1) if overlap is None else int(overlap),
            suffix=str(options.get("suffix") or "jpeg"),
            quality=int(options.get("quality") or 75),
            iiif_id=str(options.get("iiif_id") or _IIIF_ID),
        )
        layout.check()
        return layout

    def check(self) -> None:
        """Raise `InvalidTileSet` for options this layout cannot be written with."""
        if self.suffix not in _SUFFIXES:
            raise InvalidTileSet(f"tile suffix must be one of {', '.join(_SUFFIXES)}")
        if not 2 <= self.tile_size <= 8192 or self.tile_size % 2:
            # Blocks hand their next halving to the merger: it must start on an even pixel.
            raise InvalidTileSet(
                f"tile sets take an even tile size from 2 to 8192, got {self.tile_size}"
            )
        if self.iiif and self.overlap:
            raise InvalidTileSet("IIIF tiles have no overlap")
        if not 0 <= self.overlap <= self.tile_size // 2:
            raise InvalidTileSet(f"overlap must be from 0 to {self.tile_size // 2}")
        if not re.fullmatch(IIIF_ID_PATTERN, self.iiif_id) or len(self.iiif_id) > 1000:
            raise InvalidTileSet(
                "iiif_id must be an http or https URL of printable ASCII, without spaces, "
                "quotes or backslashes, not ending in /, at most 1,000 characters"
            )

    @property
    def direct(self) -> bool:
        """Whether libvips writes JPEG tiles from an 8-bit copy of the image (its default)."""
        return self.suffix == "jpeg"

    @property
    def content_type(self) -> str:
        """The tiles' media type."""
        return f"image/{self.suffix}"

    @property
    def file_suffix(self) -> str:
        """The tiles' file extension, as dzsave names them."""
        return "jpg" if self.iiif and self.direct else self.suffix

    def dzsave_arguments(self) -> dict[str, Any]:
        """The ``dzsave`` arguments whose tiles this layout reproduces."""
        arguments: dict[str, Any] = {"tile_size": self.tile_size, "overlap": self.overlap}
        if self.iiif:
            arguments["layout"] = "iiif3"
            arguments["id"] = self.iiif_id
        if self.direct:
            arguments["Q"] = self.quality
        elif self.suffix == "webp":
            arguments["suffix"] = f".webp[Q={self.quality}]"
        else:
            arguments["suffix"] = f".{self.suffix}"
        return arguments

    def check_result(self, pixel_format: str) -> None:
        """Raise `InvalidTileSet` when the result's pixels cannot make these tiles.

        libvips converts any other format to 8 bits before it shrinks for JPEG tiles, with
        rules of its own that tilefan does not repeat.
        """
        if self.direct and pixel_format != "uchar":
            raise InvalidTileSet(
                f"JPEG tiles need an 8-bit result, this one is {pixel_format}: "
                "add a step that makes it 8-bit, or ask for png or webp tiles"
            )

    def saveable(self, image: pyvips.Image) -> pyvips.Image:
        """The pixels the pyramid is made of: JPEG tiles take 8-bit colour, alpha flattened."""
        if not self.direct:
            return image
        self.check_result(image.format)
        return image.flatten(background=255) if image.hasalpha() else image

    def level_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """Each level's size, full resolution first, as dzsave builds its pyramid."""
        limit = self.tile_size if self.iiif else 1
        sizes = [(width, height)]
        while max(sizes[-1]) > limit:
            w, h = sizes[-1]
            sizes.append(((w + 1) // 2, (h + 1) // 2))
        return sizes

    def tile_rect(self, width: int, height: int, column: int, row: int) -> Rect:
        """Where tile (column, row) lies in a level of this size, its overlap included."""
        core = Rect(column * self.tile_size, row * self.tile_size, self.tile_size, self.tile_size)
        return core.grow(*(self.overlap,) * 4).clip(width, height)

    def tiles(self, width: int, height: int, core: Rect) -> Iterator[tuple[int, int, Rect]]:
        """The tiles of a level of this size whose square starts inside ``core``."""
        size = self.tile_size
        for row in range(-(-core.y // size), -(-core.bottom // size)):
            for column in range(-(-core.x // size), -(-core.right // size)):
                yield column, row, self.tile_rect(width, height, column, row)

    def encode(self, tile: pyvips.Image) -> bytes:
        """One tile's file, encoded as dzsave encodes it (no metadata)."""
        if self.direct:
            data: bytes = tile.jpegsave_buffer(Q=self.quality, keep="none")
        elif self.suffix == "webp":
            data = tile.webpsave_buffer(Q=self.quality, keep="none")
        else:
            data = tile.pngsave_buffer(keep="none")
        return data

    def tile_name(self, sizes: list[tuple[int, int]], level: int, column: int, row: int) -> str:
        """A tile's path in the set, below its root (``<name>_files`` or the IIIF folder).

        ``level`` counts from full resolution (0) down; DeepZoom numbers levels from 1x1 (0)
        up, IIIF names a tile by its full-resolution region and its size.
        """
        width, height = sizes[level]
        if not self.iiif:
            return f"{len(sizes) - 1 - level}/{column}_{row}.{self.file_suffix}"
        full_width, full_height = sizes[0]
        scale = 2**level
        left, top = column * self.tile_size * scale, row * self.tile_size * scale
        region_w = min(self.tile_size * scale, full_width - left)
        region_h = min(self.tile_size * scale, full_height - top)
        size = (
            f"{min(self.tile_size, width - column * self.tile_size)},"
            f"{min(self.tile_size, height - row * self.tile_size)}"
        )
        if (left, top, region_w, region_h) == (0, 0, full_width, full_height):
            region = "full"
        else:
            region = f"{left},{top},{region_w},{region_h}"
        return f"{region}/{size}/0/default.{self.file_suffix}"

    def descriptor(self, width: int, height: int, name: str) -> bytes:
        """The ``.dzi`` of a DeepZoom set, or the ``info.json`` of an IIIF one, as dzsave's."""
        if not self.iiif:
            return (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008"\n'
                f'  Format="{self.file_suffix}"\n'
                f'  Overlap="{self.overlap}"\n'
                f'  TileSize="{self.tile_size}"\n'
                "  >\n"
                "  <Size \n"
                f'    Height="{height}"\n'
                f'    Width="{width}"\n'
                "  />\n"
                "</Image>\n"
            ).encode()
        levels = len(self.level_sizes(width, height))
        info = {
            "@context": "http://iiif.io/api/image/3/context.json",
            "id": f"{self.iiif_id}/{name}",
            "type": "ImageService3",
            "profile": "level0",
            "protocol": "http://iiif.io/api/image",
            "tiles": [{"scaleFactors": [2**i for i in range(levels)], "width": self.tile_size}],
            "width": width,
            "height": height,
        }
        return (json.dumps(info, indent=2) + "\n").encode()


def halve_padded(block: pyvips.Image) -> pyvips.Image:
    """The next dzsave level of ``block``: an odd last column or row doubled, then halved.

    A block that starts on even coordinates halves exactly as its part of the whole level,
    when its odd edge (if any) is the level's own.
    """
    pad_x, pad_y = block.width % 2, block.height % 2
    if pad_x or pad_y:
        block = block.embed(0, 0, block.width + pad_x, block.height + pad_y, extend="copy")
    return halve(block)
