"""Bad and unusual inputs through the whole pipeline on the embedded engine.

Every file in ../shared/images and a set of generated ones (empty, random, mislabelled, cut
short, bombs, a huge ICC profile, several pages) is uploaded and run through split, tiles and
merge. Each ends SUCCEEDED with a result equal to whole-image libvips (first page, EXIF
orientation applied), or FAILED with its own code; a bomb is refused from its header, before
any decode (`tilefan.stages.split.transcode` is watched). No job leaves intermediates.

The table in docs/bad-inputs.md is this module's output: `TILEFAN_WRITE_DOCS=1` rewrites it, and
every other run fails if the committed table differs from what the run produced.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pyvips

import tilefan.stages.split
from tests.support import (
    NO_SHARED,
    SHARED_IMAGES,
    assert_identical,
    noise_image,
    shared_image_names,
)
from tilefan import parse_chain
from tilefan.formats.source import upright
from tilefan.local.stack import LocalStack, local_stack, run_job
from tilefan.state.jobs import JobStatus
from tilefan.state.storage import keys

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
WRITE_DOCS = os.environ.get("TILEFAN_WRITE_DOCS") == "1"
OPS = [{"op": "gaussblur", "sigma": 1.5}, {"op": "invert"}]
ICC_BYTES = 10 * 2**20
CODES = {"UNSUPPORTED_FORMAT", "DAMAGED_IMAGE", "TOO_MANY_PIXELS"}
"""The codes a bad input may end with: each says what is wrong with the file."""


# --- generated inputs -----------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG written by hand: an IHDR declaring ``width`` x ``height`` RGB, a token IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def tiff_with_strip(width: int, height: int, *, keep: float) -> bytes:
    """An 8-bit grey TIFF written by hand, directory first, with ``keep`` of its pixel data."""
    entries = [  # tag, type (3 short, 4 long), value
        (256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 4, 0), (277, 3, 1), (278, 3, height), (279, 4, width * height),
    ]  # fmt: skip
    data_at = 8 + 2 + 12 * len(entries) + 4
    directory = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, 1) + packed
    directory += struct.pack("<I", 0)
    pixels = np.random.default_rng(4).integers(0, 256, width * height, dtype=np.uint8).tobytes()
    return b"II*\x00" + struct.pack("<I", 8) + directory + pixels[: int(len(pixels) * keep)]


def _write(data: bytes | str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)

    return build


def _tiff_cut_in_half(path: Path) -> None:
    whole = noise_image(300, 200, 3, seed=2).tiffsave_buffer()
    path.write_bytes(whole[: len(whole) // 2])  # libvips writes the directory after the pixels


def _huge_icc(path: Path) -> None:
    image = noise_image(300, 200, 3, seed=3)
    srgb = image.icc_transform("srgb", input_profile="srgb").get("icc-profile-data")
    # A real profile grown to ICC_BYTES (the header's first field is the profile's size); in a
    # PNG it is deflated, so the file stays small while every copy of the profile is 10 MB.
    profile = struct.pack(">I", ICC_BYTES) + srgb[4:] + b"\x00" * (ICC_BYTES - len(srgb))
    tagged = image.copy()
    tagged.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    tagged.pngsave(str(path))


def _three_pages(path: Path) -> None:
    pages = [noise_image(200, 150, 3, seed=seed) for seed in (10, 11, 12)]
    stacked = pyvips.Image.arrayjoin(pages, across=1).copy()
    stacked.set_type(pyvips.GValue.gint_type, "page-height", 150)
    stacked.tiffsave(str(path))


def _exif_rotated(path: Path) -> None:
    image = noise_image(240, 160, 3, seed=5).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    image.jpegsave(str(path), Q=95)


@dataclass(frozen=True)
class Generated:
    """An input this module writes, what it is, and how its job must end."""

    name: str
    description: str
    build: Callable[[Path], None]
    expected: str


GENERATED = [
    Generated("empty.jpg", "zero-byte file", _write(b""), "UNSUPPORTED_FORMAT"),
    Generated(
        "random.bin",
        "4 KiB of random bytes",
        _write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "UNSUPPORTED_FORMAT",
    ),
    Generated(
        "text.jpg",
        "a text file named .jpg",
        _write("This is a plain text file, not a JPEG.\n" * 20),
        "UNSUPPORTED_FORMAT",
    ),
    Generated(
        "tiff-cut-in-half.tif",
        "TIFF cut in half: its directory (written after the pixels) is lost",
        _tiff_cut_in_half,
        "DAMAGED_IMAGE",
    ),
    Generated(
        "tiff-short-pixels.tif",
        "TIFF written by hand, directory first, whose pixel data stops halfway",
        _write(tiff_with_strip(300, 200, keep=0.5)),
        "DAMAGED_IMAGE",
    ),
    Generated(
        "png-100000x100000.png",
        f"PNG written by hand whose IHDR declares 100000 x 100000 pixels "
        f"({len(png_declaring(100_000, 100_000))} bytes)",
        _write(png_declaring(100_000, 100_000)),
        "TOO_MANY_PIXELS",
    ),
    Generated(
        "png-20000x20000.png",
        "PNG written by hand declaring 20000 x 20000 (under the pixel limit) in "
        f"{len(png_declaring(20_000, 20_000))} bytes",
        _write(png_declaring(20_000, 20_000)),
        "TOO_MANY_PIXELS",
    ),
    Generated(
        "svg-200000x200000.svg",
        "SVG whose root declares 200000 x 200000",
        _write(
            '<svg xmlns="http://www.w3.org/2000/svg" width="200000" height="200000">'
            '<rect width="10" height="10"/></svg>'
        ),
        "TOO_MANY_PIXELS",
    ),
    Generated(
        "huge-icc.png",
        "300 x 200 PNG carrying a 10 MiB ICC profile (deflated in the file)",
        _huge_icc,
        "SUCCEEDED",
    ),
    Generated("three-pages.tif", "3-page TIFF, each page different", _three_pages, "SUCCEEDED"),
    Generated("exif-rotated.jpg", "JPEG with EXIF orientation 6", _exif_rotated, "SUCCEEDED"),
]

SHARED_EXPECTED = {"17000x17000.avif": "TOO_MANY_PIXELS", "truncated.jpg": "DAMAGED_IMAGE"}
"""Shared images that must fail, and how; every other shared image must succeed."""


def shared_descriptions() -> dict[str, str]:
    """What ../shared/images/README.md says each file is."""
    readme = SHARED_IMAGES / "README.md"
    if not readme.exists():
        return {}
    described: dict[str, str] = {}
    for line in readme.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and not set(cells[0]) <= {"-", " "} and cells[0] != "file":
            for name in cells[0].split(","):
                described[name.strip()] = cells[1]
    return described


# --- running the corpus ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one input's job ended, and what the run observed on the way."""

    status: JobStatus
    code: str | None
    message: str
    decoded: bool
    detail: str
    equal: bool | None
    leftovers: tuple[str, ...]
    results: tuple[str, ...]
    execution: str
    bytes_split: int | None
    icc_kept: bool | None


class Corpus:
    """Runs each input's job once, on first request, and remembers the outcome."""

    def __init__(self, stack: LocalStack, folder: Path, decoded: list[str]) -> None:
        self.stack = stack
        self.folder = folder
        self.decoded = decoded
        self.outcomes: dict[str, Outcome] = {}

    def path(self, name: str) -> Path:
        generated = {case.name: case for case in GENERATED}
        if name not in generated:
            return SHARED_IMAGES / name
        path = self.folder / name
        if not path.exists():
            generated[name].build(path)
        return path

    def outcome(self, name: str) -> Outcome:
        if name not in self.outcomes:
            self.outcomes[name] = self._run(self.path(name))
        return self.outcomes[name]

    def _run(self, source: Path) -> Outcome:
        self.decoded.clear()
        output = self.folder / f"{source.name}.result.tif"
        view = run_job(
            self.stack,
            source,
            output,
            OPS,
            output_format="tiff",
            tile_size=_tile_size(source),
            poll_seconds=0.02,
            timeout=300,
        )
        job = view.job
        execution = self.stack.engine.wait(str(job.execution_arn), timeout=60)["status"]
        store = self.stack.service.store
        outcome: dict[str, Any] = {
            "status": job.status,
            "code": (job.error or {}).get("code"),
            "message": (job.error or {}).get("message", ""),
            "decoded": bool(self.decoded),
            "equal": None,
            "leftovers": tuple(store.list_keys(keys.job_prefix(job.job_id))),
            "results": tuple(store.list_keys(f"results/{job.job_id}/")),
            "execution": execution,
            "bytes_split": (job.grid or {}).get("bytes_split"),
            "icc_kept": None,
            "detail": job.error["message"] if job.error else "",
        }
        if job.status is JobStatus.SUCCEEDED:
            first_page = pyvips.Image.new_from_file(str(source))
            expected = reduce(
                lambda im, step: step.apply(im), parse_chain(OPS), upright(first_page)
            )
            actual = pyvips.Image.new_from_file(str(output))
            try:
                assert_identical(expected, actual)
                outcome["equal"] = True
            except AssertionError:
                outcome["equal"] = False
            outcome["icc_kept"] = _icc(first_page) == _icc(actual)
            outcome["detail"] = _describe_success(first_page, actual, job.grid or {}, outcome)
        return Outcome(**outcome)


def _tile_size(source: Path) -> int:
    """About three tiles across the longer side: several tiles, few enough for CI."""
    try:
        header = pyvips.Image.new_from_file(str(source))
    except pyvips.Error:
        return 256
    return max(64, min(1024, -(-max(header.width, header.height) // 3)))


def _icc(image: pyvips.Image) -> bytes | None:
    if image.get_typeof("icc-profile-data") == 0:
        return None
    return bytes(image.get("icc-profile-data"))


def _describe_success(
    source: pyvips.Image, result: pyvips.Image, grid: dict[str, Any], outcome: dict[str, Any]
) -> str:
    pages = source.get("n-pages") if source.get_typeof("n-pages") else 1
    bands, tiles = result.bands, grid.get("tile_count")
    parts = [
        f"{result.width} x {result.height}, {bands} band{'s' * (bands != 1)}, {result.format}",
        f"{tiles} tile{'s' * (tiles != 1)}",
    ]
    if pages > 1:
        parts.append(f"first of {pages} pages")
    if source.get_typeof("orientation") and source.get("orientation") != 1:
        parts.append(f"EXIF orientation {source.get('orientation')} applied")
    if _icc(source) is not None:
        parts.append(f"ICC profile ({len(_icc(source) or b''):,} bytes) kept")
    same = "equals" if outcome["equal"] else "DIFFERS FROM"
    parts.append(f"{same} whole-image libvips")
    return "; ".join(parts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    decoded: list[str] = []
    real = tilefan.stages.split.transcode

    def watched(image: pyvips.Image, *args: Any) -> int:
        decoded.append(str(args[2]))
        return real(image, *args)

    with pytest.MonkeyPatch.context() as patch, local_stack() as stack:
        patch.setattr(tilefan.stages.split, "transcode", watched)
        yield Corpus(stack, tmp_path_factory.mktemp("bad-inputs"), decoded)


def check(outcome: Outcome, expected: str) -> None:
    """What every input's run must show, whatever the input."""
    assert outcome.execution in ("SUCCEEDED", "FAILED"), "the execution did not end"
    assert outcome.leftovers == (), "intermediates were left behind"
    if expected == "SUCCEEDED":
        assert outcome.status is JobStatus.SUCCEEDED, (outcome.code, outcome.message)
        assert outcome.equal, outcome.detail
        assert outcome.icc_kept, "the result lost the input's ICC profile"
        assert len(outcome.results) == 1
        return
    assert outcome.status is JobStatus.FAILED
    assert outcome.code == expected, outcome.message
    assert outcome.code in CODES and outcome.message
    assert outcome.results == ()
    if expected in ("TOO_MANY_PIXELS", "UNSUPPORTED_FORMAT"):
        assert not outcome.decoded, "refused only after decoding: the header should have said"


@pytest.mark.parametrize("case", GENERATED, ids=lambda case: case.name)
def test_generated_input_ends_as_expected(corpus: Corpus, case: Generated) -> None:
    check(corpus.outcome(case.name), case.expected)


@pytest.mark.shared_images
@pytest.mark.parametrize("name", shared_image_names() or ["<none>"])
def test_shared_image_ends_as_expected(corpus: Corpus, name: str) -> None:
    if name == "<none>":
        pytest.skip(NO_SHARED)
    check(corpus.outcome(name), SHARED_EXPECTED.get(name, "SUCCEEDED"))


def test_huge_icc_profile_travels_once_not_once_per_tile(corpus: Corpus) -> None:
    outcome = corpus.outcome("huge-icc.png")
    assert outcome.status is JobStatus.SUCCEEDED
    # The transcoded source holds the profile once (its tile 0 gives the result its
    # metadata), not once per tile: 20 copies would be 200 MiB for a 200 KB upload.
    assert outcome.bytes_split is not None
    assert ICC_BYTES < outcome.bytes_split < 2 * ICC_BYTES


def test_damaged_pixels_are_refused_while_decoding_not_passed_on_black(corpus: Corpus) -> None:
    outcome = corpus.outcome("tiff-short-pixels.tif")
    assert (outcome.code, outcome.decoded) == ("DAMAGED_IMAGE", True)
    assert "Read error" in outcome.message


# --- the docs' table ------------------------------------------------------------------------

GENERATED_HEADING = "## Generated inputs"
SHARED_HEADING = "## The shared test images"


def render_rows(corpus: Corpus, names: list[str], descriptions: dict[str, str]) -> list[str]:
    rows = [
        "| input | what it is | outcome | decoded | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        outcome = corpus.outcome(name)
        ending = outcome.status.value + (f" `{outcome.code}`" if outcome.code else "")
        decoded = "yes" if outcome.decoded else "no"
        detail = outcome.detail.replace("|", "\\|").replace(str(corpus.folder), "…")
        rows.append(
            f"| `{name}` | {descriptions.get(name, '')} | {ending} | {decoded} | {detail} |"
        )
    return rows


def render_generated(corpus: Corpus) -> str:
    descriptions = {case.name: case.description for case in GENERATED}
    rows = render_rows(corpus, [case.name for case in GENERATED], descriptions)
    return "\n".join([GENERATED_HEADING, "", *rows, ""])


def render_shared(corpus: Corpus) -> str:
    rows = render_rows(corpus, shared_image_names(), shared_descriptions())
    intro = (
        "Real-world files from the libvips test suite, described in "
        "`../shared/images/README.md`; read in place, never copied into the project."
    )
    return "\n".join([f"{SHARED_HEADING} (`../shared/images`)", "", intro, "", *rows, ""])


HEADER = """# Bad inputs and their outcomes

Generated by `tests/integration/test_bad_inputs.py`: do not edit by hand. Rewrite it with

```sh
TILEFAN_WRITE_DOCS=1 .venv/bin/pytest tests/integration/test_bad_inputs.py
```

Every other run of that module fails if this file differs from what the run produced, so the
table cannot drift from the code (a libvips upgrade that rewords an error shows up here too).

Each input goes through the whole pipeline on the embedded engine: upload, `Split`,
`ProcessTiles`, `Merge` (or `Abort`), with the chain `gaussblur(sigma=1.5) → invert`, TIFF output
and about three tiles across the longer side. A job ends SUCCEEDED with a result equal, pixel for
pixel, to whole-image libvips on the first page with the EXIF orientation applied, or FAILED with
the code and sentence shown. "decoded" says whether the splitter started decoding pixels: inputs
refused from their header (bombs, unknown formats) never are. No job leaves anything under
`jobs/`, and a failed job has no result.

Codes: `UNSUPPORTED_FORMAT` (not an image format tilefan reads), `DAMAGED_IMAGE` (a readable
format that cannot be decoded), `TOO_MANY_PIXELS` (the header declares more than
`TILEFAN_MAX_PIXELS`, or more than `TILEFAN_MAX_PIXELS_PER_BYTE` pixels per byte of file). The
sentences name the file `upload`: the splitter's name for the uploaded object.
"""


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^{re.escape(heading)}.*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(0).strip() if match else ""


def test_docs_table_is_what_this_run_produced(corpus: Corpus) -> None:
    committed = DOC.read_text() if DOC.exists() else ""
    generated = render_generated(corpus)
    # Without the shared images their section is kept as committed: it cannot be checked.
    has_shared = bool(shared_image_names())
    shared = render_shared(corpus) if has_shared else _section(committed, SHARED_HEADING)
    produced = "\n".join([HEADER, generated, shared]).rstrip() + "\n"
    if WRITE_DOCS:
        DOC.write_text(produced)
        committed = produced
    assert _section(committed, GENERATED_HEADING) == generated.strip(), (
        f"{DOC} is stale: run TILEFAN_WRITE_DOCS=1 .venv/bin/pytest {__file__}"
    )
    assert committed == produced, f"{DOC} is stale: run TILEFAN_WRITE_DOCS=1 .venv/bin/pytest"
    if not shared_image_names():
        pytest.skip(f"the shared images' rows were not checked: {NO_SHARED}")
