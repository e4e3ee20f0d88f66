"""tilefan: process very large images as parallel tiles, equal to whole-image libvips."""

from __future__ import annotations

from tilefan.errors import (
    DamagedImage,
    InvalidChain,
    InvalidTileSize,
    JobNotFound,
    OutputTooLarge,
    TileFailed,
    TilefanError,
    TooManyPixels,
    TransientError,
    UnsupportedImage,
)
from tilefan.formats.source import open_checked
from tilefan.imaging.execute import assemble, execute_tile, process_tiled
from tilefan.imaging.geometry import Rect
from tilefan.imaging.operations import Chain, Operation, OpKind, operation_names, parse_chain
from tilefan.imaging.plan import ImageSpec, Tile, TilePlan, check_chain, plan_tiles

__all__ = [
    "Chain",
    "DamagedImage",
    "ImageSpec",
    "InvalidChain",
    "InvalidTileSize",
    "JobNotFound",
    "OpKind",
    "Operation",
    "OutputTooLarge",
    "Rect",
    "Tile",
    "TileFailed",
    "TilePlan",
    "TilefanError",
    "TooManyPixels",
    "TransientError",
    "UnsupportedImage",
    "assemble",
    "check_chain",
    "execute_tile",
    "open_checked",
    "operation_names",
    "parse_chain",
    "plan_tiles",
    "process_tiled",
]
