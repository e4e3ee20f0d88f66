"""The `tilefan` command as a user runs it: run, submit, and what they print when refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips

from tests.support import assert_identical, noise_image, whole
from tilefan.cli import main, parse_op
from tilefan.formats.dz_tiles import TileSetLayout
from tilefan.imaging.operations import operation_names
from tilefan.local.serve import LocalApi, serve_api

pytestmark = pytest.mark.integration

OPS = [{"op": "gaussblur", "sigma": 1.5}, {"op": "flip", "direction": "vertical"}]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "input.png"
    noise_image(210, 150, 3, seed=11).pngsave(str(path))
    return path


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("invert", {"op": "invert"}),
        ("gaussblur:sigma=4", {"op": "gaussblur", "sigma": 4}),
        ("rot:angle=d90", {"op": "rot", "angle": "d90"}),
        (
            "conv:mask=[[1,2],[3,4]],scale=10",
            {"op": "conv", "mask": [[1, 2], [3, 4]], "scale": 10},
        ),
    ],
)
def test_op_text_is_a_step(text: str, step: dict[str, Any]) -> None:
    assert parse_op(text) == step


def test_run_writes_what_whole_image_libvips_gives(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ops_file = tmp_path / "ops.json"
    ops_file.write_text(json.dumps(OPS[:1]))
    output = tmp_path / "out.tif"
    argv = ["run", str(source), "-o", str(output), "--ops-file", str(ops_file)]
    assert main([*argv, "--op", "flip:direction=vertical", "--tile-size", "64"]) == 0
    expected = whole(pyvips.Image.new_from_file(str(source)), OPS)
    assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    assert capsys.readouterr().out.startswith(f"{output} (210x150, ")


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["run", "{missing}", "-o", "{tmp}/out.tif", "--op", "invert"], "INPUT_MISSING"),
        (["run", "{source}", "-o", "{tmp}/out.xyz", "--op", "invert"], "UNKNOWN_FORMAT"),
        (["run", "{source}", "-o", "{tmp}/out.tif", "--op", "blur"], "INVALID_CHAIN"),
        (
            ["run", "{source}", "-o", "{tmp}/out.tif", "--op", "invert", "--tile-size", "7"],
            "INVALID_TILE_SIZE",
        ),
        (["run", "{damaged}", "-o", "{tmp}/out.tif", "--op", "invert"], "DAMAGED_IMAGE"),
        (["run", "{wide}", "-o", "{tmp}/out.webp", "--op", "resize:scale=16"], "OUTPUT_TOO_LARGE"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_run_refuses_with_the_code_and_writes_nothing(
    argv: list[str], code: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    wide = tmp_path / "wide.png"
    pyvips.Image.black(1100, 20).pngsave(str(wide))
    names = {
        "source": source,
        "damaged": damaged,
        "wide": wide,
        "missing": tmp_path / "missing.png",
        "tmp": tmp_path,
    }
    assert main([arg.format(**names) for arg in argv]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {code}: "), error
    assert not list(tmp_path.glob("out.*"))


def test_run_help_lists_the_operations_and_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = capsys.readouterr().out
    for name in operation_names():
        assert name in shown
    words = " ".join(shown.split())  # argparse wraps its help to the terminal's width
    assert "64 to 8192 (default: 1024)" in words  # the tile size
    assert "(default: 4)" in words  # the concurrency
    for option in (
        "--compression",
        "--pyramid",
        "--quality",
        "--lossless",
        "--dz-tile-size",
        "--overlap",
        "--suffix",
    ):
        assert option in shown


@pytest.mark.parametrize(
    ("suffix", "options", "saver"),
    [
        ("jpg", ["--quality", "40"], {"Q": 40}),
        ("webp", ["--lossless"], {"lossless": True}),
        # Large enough for a level below the full size (pyramid levels stop at one 256 px tile).
        ("tif", ["--compression", "none", "--pyramid", "--op", "resize:scale=4"], None),
    ],
)
def test_run_passes_the_output_options(
    source: Path, tmp_path: Path, suffix: str, options: list[str], saver: dict[str, Any] | None
) -> None:
    output = tmp_path / f"out.{suffix}"
    argv = ["run", str(source), "-o", str(output), "--op", "invert", "--tile-size", "64"]
    assert main([*argv, *options]) == 0
    if saver is None:
        result = pyvips.Image.new_from_file(str(output))
        assert result.get("n-pages") > 1
        assert output.stat().st_size > result.width * result.height * result.bands
        return
    expected = whole(pyvips.Image.new_from_file(str(source)), [{"op": "invert"}])
    # The result is what libvips' saver makes of the whole image with those options.
    reference = expected.write_to_buffer(f".{suffix}", **saver)
    assert_identical(
        pyvips.Image.new_from_buffer(reference, ""), pyvips.Image.new_from_file(str(output))
    )


def test_run_makes_no_preview(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No job page shows a run's result: its workers and merger do not cut a preview (which
    # also held every preview tile in the engine's memory).
    from tilefan.local import stack

    outputs: list[dict[str, Any]] = []
    run_job = stack.run_job

    def recorded(*args: Any, **kwargs: Any) -> Any:
        view = run_job(*args, **kwargs)
        outputs.append(view.job.output)
        return view

    monkeypatch.setattr(stack, "run_job", recorded)
    argv = ["run", str(source), "-o", str(tmp_path / "out.tif"), "--op", "invert"]
    assert main([*argv, "--tile-size", "256"]) == 0
    assert len(outputs) == 1
    assert outputs[0]["key"].endswith(".tif")
    assert "preview" not in outputs[0]


@pytest.mark.parametrize(
    ("output", "options", "descriptor", "tiles"),
    [
        ("out.dzi", ["--dz-tile-size", "128", "--overlap", "2"], "out.dzi", "out_files"),
        ("set", ["--format", "iiif", "--suffix", "png"], "set/info.json", "set"),
    ],
)
def test_run_writes_a_tile_set_where_its_output_names(
    source: Path, tmp_path: Path, output: str, options: list[str], descriptor: str, tiles: str
) -> None:
    argv = ["run", str(source), "-o", str(tmp_path / output), "--op", "invert"]
    assert main([*argv, *options]) == 0
    assert (tmp_path / descriptor).is_file()
    written = sorted(p.relative_to(tmp_path / tiles) for p in (tmp_path / tiles).rglob("*.*"))
    reference = tmp_path / "libvips"
    expected = whole(pyvips.Image.new_from_file(str(source)), [{"op": "invert"}])
    layout = TileSetLayout.from_options(
        "iiif" if "iiif" in options else "dzi", _tileset_options(options)
    )
    expected.dzsave(str(reference), **layout.dzsave_arguments())
    if layout.iiif:
        wanted = sorted(p.relative_to(reference) for p in reference.rglob("*.*"))
    else:
        folder = tmp_path / "libvips_files"
        wanted = sorted(p.relative_to(folder) for p in folder.rglob("*.*"))
        wanted.remove(Path("vips-properties.xml"))
    assert written == wanted


def _tileset_options(argv: list[str]) -> dict[str, Any]:
    flags = {"--dz-tile-size": "tile_size", "--overlap": "overlap", "--suffix": "suffix"}
    pairs = zip(argv[::2], argv[1::2], strict=True)
    return {flags[flag]: int(v) if v.isdigit() else v for flag, v in pairs if flag in flags}


def test_run_refuses_a_quality_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "in.png", "-o", "out.jpg", "--quality", "101"]) == 2
    assert "quality must be from 1 to 100" in capsys.readouterr().err


@pytest.fixture(scope="module")
def api() -> Iterator[LocalApi]:
    with serve_api(port=0) as served:
        yield served


def test_submit_through_the_api_writes_what_whole_image_libvips_gives(
    api: LocalApi, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.png"
    argv = ["submit", str(source), "-o", str(output), "--api", api.url, "--key", api.keys[0]]
    steps = [arg for step in OPS for arg in ("--op", _op_text(step))]
    assert main([*argv, *steps, "--tile-size", "64", "--poll", "0.05"]) == 0
    expected = whole(pyvips.Image.new_from_file(str(source)), OPS)
    assert_identical(expected, pyvips.Image.new_from_file(str(output)))
    printed = capsys.readouterr()
    assert printed.out.startswith(f"{output} (210x150); job ")
    assert f"watch it in a browser: {api.url}/jobs/" in printed.err


def test_submit_refused_by_the_api_prints_its_code(
    api: LocalApi, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.png"
    argv = ["submit", str(source), "-o", str(output), "--api", api.url, "--key", "not-a-key"]
    assert main([*argv, "--op", "invert"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: FORBIDDEN: ")
    assert not output.exists()


def _op_text(step: dict[str, Any]) -> str:
    params = ",".join(f"{key}={value}" for key, value in step.items() if key != "op")
    return f"{step['op']}:{params}" if params else step["op"]
