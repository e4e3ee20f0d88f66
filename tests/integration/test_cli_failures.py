"""Every way the `tilefan` command fails: one line on stderr with a code, never a traceback."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pyvips

import tilefan.cli
from tests.support import assert_identical, noise_image
from tilefan.cli import main
from tilefan.imaging.operations import operation_names

pytestmark = pytest.mark.integration


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Names the argument lists below use, as {name}."""
    source = tmp_path / "input.png"
    noise_image(96, 80, 3, seed=3).pngsave(str(source))
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    (tmp_path / "not-json.json").write_text("[{'op': 'invert'}")
    (tmp_path / "not-a-list.json").write_text('{"op": "invert"}')
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("")
    return {
        "source": source,
        "damaged": damaged,
        "tmp": tmp_path,
        "missing": tmp_path / "missing.png",
    }


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing answers on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_cli(argv: list[str], files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> Any:
    status = main([arg.format(**files) for arg in argv])
    return status, capsys.readouterr()


def assert_one_line(captured: Any, code: str) -> str:
    """Exactly one line on stderr, with the code; nothing on stdout; no traceback anywhere."""
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {code}: "), lines[0]
    assert captured.out == ""
    return lines[0]


RUN = ["run", "{source}", "-o", "{tmp}/out.tif"]
NO_JOB_FAILURES = [
    # (argv, exit status, code): refused before a job starts
    ([*RUN[:3], "{tmp}/no-such-folder/out.tif", "--op", "invert"], 1, "OUTPUT_UNWRITABLE"),
    ([*RUN[:3], "{tmp}/a-folder", "--format", "tiff", "--op", "invert"], 1, "OUTPUT_UNWRITABLE"),
    ([*RUN, "--ops-file", "{tmp}/no-such.json"], 1, "INVALID_OPS_FILE"),
    ([*RUN, "--ops-file", "{tmp}/not-json.json"], 1, "INVALID_OPS_FILE"),
    ([*RUN, "--ops-file", "{tmp}/not-a-list.json"], 1, "INVALID_OPS_FILE"),
    (RUN, 1, "NO_OPERATIONS"),
    ([*RUN, "--op", "invert", "--concurrency", "-2"], 1, "INVALID_CONCURRENCY"),
    ([*RUN, "--op", "invert", "--concurrency", "0"], 1, "INVALID_CONCURRENCY"),
    ([*RUN, "--op", "invert", "--concurrency", "100000"], 1, "INVALID_CONCURRENCY"),
    ([*RUN, "--op", "invert", "--concurrency", "four"], 1, "INVALID_CONCURRENCY"),
    ([*RUN[:3], "{tmp}/y.dzi", "--dz-tile-size", "255", "--op", "invert"], 1, "INVALID_TILE_SET"),
    (
        [*RUN[:3], "{tmp}/y", "--format", "iiif", "--overlap", "1", "--op", "invert"],
        1,
        "INVALID_TILE_SET",
    ),
    (
        ["run", "{source}", "-o", "{source}", "--format", "iiif", "--op", "invert"],
        1,
        "OUTPUT_UNWRITABLE",
    ),
    ([*RUN[:3], "{tmp}/out.xyz", "--op", "invert"], 1, "UNKNOWN_FORMAT"),
    (["run", "{missing}", "-o", "{tmp}/out.tif", "--op", "invert"], 1, "INPUT_MISSING"),
    ([*RUN, "--op", "nosuch"], 1, "INVALID_CHAIN"),
    ([*RUN, "--op", "gaussblur:sigma"], 2, "USAGE"),
    (["run", "{source}", "--op", "invert"], 2, "USAGE"),
    (["nosuch"], 2, "USAGE"),
    (["demo", "--concurrency", "0"], 1, "INVALID_CONCURRENCY"),
    (["demo", "--megapixels", "many"], 2, "USAGE"),
    (["serve", "--port", "http"], 2, "USAGE"),
    (["submit", "{source}", "-o", "{tmp}/out.png", "--api", "http://x"], 1, "NO_OPERATIONS"),
    (
        ["submit", "{source}", "-o", "{tmp}/no/out.png", "--api", "http://x", "--op", "invert"],
        1,
        "OUTPUT_UNWRITABLE",
    ),
    (["submit", "{source}", "-o", "{tmp}/out.png", "--op", "invert"], 2, "USAGE"),
    (
        ["submit", "{source}", "-o", "{tmp}/out.dzi", "--api", "http://x", "--op", "invert"],
        1,
        "UNSUPPORTED_OUTPUT",
    ),
    (["bench", "--nonsense"], 2, "USAGE"),
    (["bench", "--key", "k"], 2, "USAGE"),
]


@pytest.mark.parametrize(
    ("argv", "status", "code"), NO_JOB_FAILURES, ids=[f"{a[0]}-{c}" for a, _, c in NO_JOB_FAILURES]
)
def test_refusals_before_any_job_are_one_line_with_a_code(
    argv: list[str],
    status: int,
    code: str,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_job(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a job started before the command line was checked")

    monkeypatch.setattr(tilefan.cli, "_run_locally", no_job)
    result, captured = run_cli(argv, files, capsys)
    assert result == status
    assert_one_line(captured, code)


def test_a_damaged_input_fails_the_job_with_one_line_and_no_log_lines(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "{damaged}", "-o", "{tmp}/out.tif", "--op", "invert", "--tile-size", "64"]
    status, captured = run_cli(argv, files, capsys)
    assert status == 1
    assert_one_line(captured, "DAMAGED_IMAGE")
    assert not list(files["tmp"].glob("out.*"))


def test_with_verbose_the_handlers_logs_go_to_stderr_not_stdout(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "{damaged}", "-o", "{tmp}/out.tif", "--op", "invert", "--tile-size", "64", "-v"]
    status, captured = run_cli(argv, files, capsys)
    assert status == 1
    assert captured.out == ""
    lines = captured.err.splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert logged, captured.err
    assert lines[-1].startswith("error: DAMAGED_IMAGE: ")


def test_submit_to_an_address_nothing_answers_on_is_one_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    api = f"http://127.0.0.1:{closed_port}"
    argv = ["submit", "{source}", "-o", "{tmp}/out.png", "--api", api, "--op", "invert"]
    status, captured = run_cli(argv, files, capsys)
    assert status == 1
    assert "cannot be reached" in assert_one_line(captured, "API_UNREACHABLE")


def test_run_and_submit_word_a_chain_error_alike(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    chain = ["--op", "nosuch", "--op", "gaussblur:sigma=-1"]
    ran = run_cli([*RUN, *chain], files, capsys)
    api = f"http://127.0.0.1:{closed_port}"
    submitted = run_cli(
        ["submit", "{source}", "-o", "{tmp}/out.png", "--api", api, *chain], files, capsys
    )
    assert ran[0] == submitted[0] == 1
    assert assert_one_line(ran[1], "INVALID_CHAIN") == assert_one_line(
        submitted[1], "INVALID_CHAIN"
    )
    assert "Input tag" not in ran[1].err


def test_serve_on_a_taken_port_is_one_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, captured = run_cli(["serve", "--port", str(taken.getsockname()[1])], files, capsys)
    assert status == 1
    assert_one_line(captured, "CANNOT_LISTEN")


@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [(RuntimeError("boom"), 1, "INTERNAL_ERROR"), (KeyboardInterrupt(), 130, "INTERRUPTED")],
)
def test_an_unexpected_error_is_still_one_line(
    raised: BaseException,
    status: int,
    code: str,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(tilefan.cli, "_run_locally", fails)
    result, captured = run_cli([*RUN, "--op", "invert"], files, capsys)
    assert result == status
    assert_one_line(captured, code)


def test_a_run_prints_one_summary_line_without_a_terminal_and_none_with_quiet(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--op", "invert", "--tile-size", "64"]
    status, captured = run_cli(argv, files, capsys)
    assert status == 0
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{files['tmp']}/out.tif (96x80, ")
    assert all(stage in lines[0] for stage in ("split", "process", "merge")), lines[0]
    assert captured.err == ""
    status, captured = run_cli([*argv, "-q"], files, capsys)
    assert (status, captured.out, captured.err) == (0, "", "")


@pytest.mark.parametrize("command", ["run", "submit"])
def test_help_lists_the_operations_and_the_defaults(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in operation_names()), text
    assert "1024" in text
    if command == "run":
        assert "default: 1024" in text and "default: 4" in text


def test_an_ops_file_holding_no_steps_asks_for_a_re_encode(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (files["tmp"] / "no-steps.json").write_text("[]")
    argv = [*RUN[:3], "{tmp}/out.png", "--ops-file", "{tmp}/no-steps.json", "--tile-size", "64"]
    status, _ = run_cli([*argv, "-q"], files, capsys)
    assert status == 0
    original = pyvips.Image.new_from_file(str(files["source"]))
    assert_identical(original, pyvips.Image.new_from_file(str(files["tmp"] / "out.png")))
