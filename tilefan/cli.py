"""The `tilefan` command: run jobs on the embedded engine, and the demo."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from tilefan.errors import TilefanError
from tilefan.jobs import JobStatus
from tilefan.outputs import OUTPUT_FORMATS, format_for_path
from tilefan.service import JobView

__all__ = ["main", "parse_op"]

DEMO_CHAIN = [{"op": "gaussblur", "sigma": 2}, {"op": "sharpen", "sigma": 1}]


def parse_op(text: str) -> dict[str, Any]:
    """``NAME[:key=value,...]`` as a step; values are JSON where they parse, else strings."""
    name, _, rest = text.partition(":")
    step: dict[str, Any] = {"op": name.strip()}
    for part in _split_top_level(rest):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--op {text!r}: expected key=value, got {part!r}")
        try:
            step[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            step[key.strip()] = value
    return step


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so lists can be values."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


class _Progress:
    """Tiles done of total and throughput, redrawn in place on a terminal, silent otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self.last = ""

    def __call__(self, view: JobView) -> None:
        if not self.enabled:
            return
        job, progress = view.job, view.progress
        if progress is None:
            line = f"{job.status.value.lower()}..."
        else:
            rate = progress.done / max(time.monotonic() - self.started, 1e-6)
            width = 30
            filled = width * progress.done // max(progress.total, 1)
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {progress.done}/{progress.total} tiles"
                f"  {rate:.1f} tiles/s  {job.status.value.lower()}"
            )
        if line != self.last:
            self.stream.write("\r" + line.ljust(len(self.last)))
            self.stream.flush()
            self.last = line

    def close(self) -> None:
        if self.enabled and self.last:
            self.stream.write("\n")


def _chain(args: argparse.Namespace) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if args.ops_file:
        steps.extend(json.loads(Path(args.ops_file).read_text()))
    steps.extend(args.op or [])
    return steps


def _run(args: argparse.Namespace) -> int:
    from tilefan.local import local_stack, run_job

    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        return _fail("INPUT_MISSING", f"{source} is not a file")
    output_format = args.format or format_for_path(output)
    if output_format is None:
        return _fail(
            "UNKNOWN_FORMAT",
            f"cannot tell the format from {output.name!r}; pass --format "
            f"({', '.join(OUTPUT_FORMATS)})",
        )
    progress = _Progress(sys.stderr)
    with local_stack() as stack:
        view = run_job(
            stack,
            source,
            output,
            _chain(args),
            output_format=output_format,
            tile_size=args.tile_size,
            concurrency=args.concurrency,
            on_progress=progress,
        )
    progress.close()
    return _report(view, output, quiet=not sys.stdout.isatty() and not args.verbose)


def _report(view: JobView, output: Path, *, quiet: bool) -> int:
    job = view.job
    if job.status is not JobStatus.SUCCEEDED:
        error = job.error or {"code": job.status.value, "message": "the job did not finish"}
        return _fail(error["code"], error["message"])
    if not quiet:
        timings = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in job.timings.items())
        assert job.output is not None
        print(
            f"{output} ({job.output['width']}x{job.output['height']}, "
            f"{job.output['size_bytes']:,} bytes); {timings}"
        )
    return 0


def _fail(code: str, message: str) -> int:
    print(f"error: {code}: {message}", file=sys.stderr)
    return 1


def _demo(args: argparse.Namespace) -> int:
    from tilefan.local import local_stack, run_job
    from tilefan.synthetic import synthetic_image

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilefan-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "demo-input.jpg"
    output = work / "demo-output.tif"
    width = height = int((args.megapixels * 1_000_000) ** 0.5)
    print(f"making a {width}x{height} synthetic image: {source}")
    synthetic_image(width, height).jpegsave(str(source), Q=90)
    print(f"running {json.dumps(DEMO_CHAIN)} on the embedded engine...")
    progress = _Progress(sys.stderr)
    started = time.monotonic()
    with local_stack() as stack:
        view = run_job(
            stack,
            source,
            output,
            DEMO_CHAIN,
            output_format="tiff",
            tile_size=args.tile_size,
            concurrency=args.concurrency,
            on_progress=progress,
        )
    progress.close()
    status = _report(view, output, quiet=False)
    if status == 0:
        print(f"result: {output}  (whole job {time.monotonic() - started:.1f}s)")
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilefan", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one job on the embedded engine")
    run.add_argument("input")
    run.add_argument("-o", "--output", required=True)
    run.add_argument(
        "--op",
        action="append",
        type=parse_op,
        metavar="NAME[:key=value,...]",
        help="a step, e.g. gaussblur:sigma=4 (repeat for a chain)",
    )
    run.add_argument("--ops-file", help="a JSON file with a list of steps (run before --op)")
    run.add_argument("--tile-size", type=int, default=None)
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--format", choices=sorted(OUTPUT_FORMATS))
    run.add_argument("-v", "--verbose", action="store_true", help="print the summary always")
    run.set_defaults(func=_run)

    demo = commands.add_parser("demo", help="make a synthetic image and run a chain on it")
    demo.add_argument("--megapixels", type=float, default=100)
    demo.add_argument("--tile-size", type=int, default=1024)
    demo.add_argument("--concurrency", type=int, default=4)
    demo.add_argument("--workdir", help="where to put the input and the result")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tilefan` console script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TilefanError as e:
        return _fail(e.code, str(e))


if __name__ == "__main__":
    sys.exit(main())
