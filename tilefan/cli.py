"""The `tilefan` command: run jobs on the embedded engine, and the demo."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from tilefan.errors import TilefanError
from tilefan.formats.outputs import OUTPUT_FORMATS, format_for_path
from tilefan.service.job_service import JobView
from tilefan.state.jobs import JobStatus

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

    def update(self, status: str, done: int, total: int) -> None:
        """Redraw the bar if anything changed."""
        if not self.enabled:
            return
        status = status.lower()
        if not total:
            line = f"{status}..."
        else:
            rate = done / max(time.monotonic() - self.started, 1e-6)
            filled = 30 * done // total
            bar = "#" * filled + "." * (30 - filled)
            line = f"[{bar}] {done}/{total} tiles  {rate:.1f} tiles/s  {status}"
        if line != self.last:
            self.stream.write("\r" + line.ljust(len(self.last)))
            self.stream.flush()
            self.last = line

    def on_view(self, view: JobView) -> None:
        """From the job records (the embedded engine)."""
        progress = view.progress
        done, total = (progress.done, progress.total) if progress else (0, 0)
        self.update(view.job.status.value, done, total)

    def on_document(self, job: Any) -> None:
        """From the API's status document."""
        tiles = job.get("tiles") or {}
        self.update(str(job["status"]), int(tiles.get("done", 0)), int(tiles.get("total", 0)))

    def close(self) -> None:
        """End the line the bar was drawn on."""
        if self.enabled and self.last:
            self.stream.write("\n")


def _chain(args: argparse.Namespace) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if args.ops_file:
        steps.extend(json.loads(Path(args.ops_file).read_text()))
    steps.extend(args.op or [])
    return steps


class _InputMissing(TilefanError):
    code = "INPUT_MISSING"


class _UnknownFormat(TilefanError):
    code = "UNKNOWN_FORMAT"


def _job_files(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The input, the output and the output format a run or submit names, checked."""
    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        raise _InputMissing(f"{source} is not a file")
    output_format = args.format or format_for_path(output)
    if output_format is None:
        raise _UnknownFormat(
            f"cannot tell the format from {output.name!r}; pass --format "
            f"({', '.join(OUTPUT_FORMATS)})"
        )
    return source, output, output_format


def _run_locally(
    source: Path, output: Path, chain: Any, output_format: str, args: argparse.Namespace
) -> JobView:
    """One job on a fresh embedded engine, with the progress bar on a terminal."""
    from tilefan.local.stack import local_stack, run_job

    progress = _Progress(sys.stderr)
    with local_stack() as stack:
        view = run_job(
            stack,
            source,
            output,
            chain,
            output_format=output_format,
            tile_size=args.tile_size,
            concurrency=args.concurrency,
            on_progress=progress.on_view if progress.enabled else None,
        )
    progress.close()
    return view


def _run(args: argparse.Namespace) -> int:
    source, output, output_format = _job_files(args)
    view = _run_locally(source, output, _chain(args), output_format, args)
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
    from tilefan.imaging.synthetic import synthetic_image

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilefan-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "demo-input.jpg"
    output = work / "demo-output.tif"
    width = height = int((args.megapixels * 1_000_000) ** 0.5)
    print(f"making a {width}x{height} synthetic image: {source}")
    synthetic_image(width, height).jpegsave(str(source), Q=90)
    print(f"running {json.dumps(DEMO_CHAIN)} on the embedded engine...")
    started = time.monotonic()
    view = _run_locally(source, output, DEMO_CHAIN, "tiff", args)
    status = _report(view, output, quiet=False)
    if status == 0:
        print(f"result: {output}  (whole job {time.monotonic() - started:.1f}s)")
    return status


def _serve(args: argparse.Namespace) -> int:
    from tilefan.local.persistence import default_data_dir
    from tilefan.local.serve import serve_api

    data_dir = None if args.ephemeral else Path(args.data_dir or default_data_dir())
    # SIGTERM stops the server as Ctrl-C does, so the data directory is saved either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with serve_api(
        host=args.host,
        port=args.port,
        keys=args.key or (),
        api_processes=args.api_processes,
        data_dir=data_dir,
    ) as api:
        print(f"tilefan API on {api.url}  (OpenAPI: {api.url}/openapi.json)")
        if api.data_dir is None:
            print("no data directory: jobs and results live only as long as this process")
        else:
            restored = api.restored
            print(f"data directory: {api.data_dir.path} (saved when the server stops)")
            if restored is not None and (restored.items or restored.objects):
                print(
                    f"restored {restored.items} table items and {restored.objects} objects; "
                    f"{len(restored.failed_jobs)} jobs that were running ended FAILED "
                    "(ENGINE_RESTARTED)"
                )
        print(f"example key: {api.keys[0]}")
        print(f"try: curl -H 'x-api-key: {api.keys[0]}' {api.url}/jobs")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping" + ("" if api.data_dir is None else ": saving the data directory"))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from tilefan.service.client import ApiError, JobFailed, TilefanClient

    source, output, output_format = _job_files(args)
    progress = _Progress(sys.stderr)
    client = TilefanClient(args.api, args.key)
    try:
        done = client.submit(
            source,
            output,
            _chain(args),
            output_format=output_format,
            tile_size=args.tile_size,
            on_progress=progress.on_document,
            poll_seconds=args.poll,
        )
    except (ApiError, JobFailed) as e:
        progress.close()
        return _fail(e.code, getattr(e, "message", str(e)))
    progress.close()
    result = done.job["output"]
    print(f"{output} ({result['width']}x{result['height']}); job {done.job['job_id']}")
    return 0


def _bench(argv: Sequence[str]) -> int:
    # The harness lives beside the package in a checkout (benchmarks/), not in the wheel.
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "cli.py").is_file():
        return _fail("NO_BENCHMARKS", f"no benchmarks/ beside {root / 'tilefan'}: use a checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # Imported by name: the harness is a tool beside the core, outside its type-checked API.
    harness = importlib.import_module("benchmarks.cli")
    return int(harness.main(argv))


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

    serve = commands.add_parser("serve", help="serve the REST API locally on the embedded engine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--key", action="append", help="an API key to accept (repeatable)")
    serve.add_argument(
        "--data-dir",
        help="keep jobs, objects and keys here across restarts "
        "(default: $XDG_DATA_HOME/tilefan/serve, else ~/.local/share/tilefan/serve)",
    )
    serve.add_argument(
        "--ephemeral",
        action="store_true",
        help="keep nothing: jobs live only as long as the server",
    )
    serve.add_argument(
        "--api-processes",
        type=int,
        default=4,
        help="API worker processes, each answering one request at a time (default 4)",
    )
    serve.set_defaults(func=_serve)

    submit = commands.add_parser("submit", help="run one job through a deployed or local API")
    submit.add_argument("input")
    submit.add_argument("-o", "--output", required=True)
    submit.add_argument("--api", required=True, help="the API's base URL")
    submit.add_argument("--key", help="the API key (x-api-key)")
    submit.add_argument("--op", action="append", type=parse_op, metavar="NAME[:key=value,...]")
    submit.add_argument("--ops-file")
    submit.add_argument("--tile-size", type=int, default=None)
    submit.add_argument("--format", choices=sorted(OUTPUT_FORMATS))
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    submit.set_defaults(func=_submit)

    # Listed for --help; main() hands everything after "bench" to the harness untouched.
    commands.add_parser(
        "bench", help="the benchmark harness, from a checkout (tilefan bench --help)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tilefan` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _bench(arguments[1:])
    args = _parser().parse_args(arguments)
    try:
        return int(args.func(args))
    except TilefanError as e:
        return _fail(e.code, str(e))


if __name__ == "__main__":
    sys.exit(main())
