"""The `tilefan` command: run jobs on the embedded engine, and the demo."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, get_args
from urllib.parse import urljoin

from tilefan.cli_failures import (
    CannotListen,
    InputMissing,
    InvalidConcurrency,
    InvalidOpsFile,
    NoBenchmarks,
    NoOperations,
    NotOneFile,
    OneLineParser,
    OutputUnwritable,
    UnknownFormat,
    fail,
    guarded,
    route_handler_logs,
)
from tilefan.formats.dz_tiles import TILESET_FORMATS, TileSetLayout
from tilefan.formats.outputs import OUTPUT_FORMATS, format_for_path
from tilefan.imaging.operations import operation_names, parse_chain
from tilefan.imaging.plan import MAX_TILE_SIZE, MIN_TILE_SIZE
from tilefan.service.job_service import JobView
from tilefan.service.schema import OutputSpec
from tilefan.settings import Settings
from tilefan.state.jobs import JobStatus

__all__ = ["main", "parse_op"]

DEMO_CHAIN = [{"op": "gaussblur", "sigma": 2}, {"op": "sharpen", "sigma": 1}]
DEFAULT_CONCURRENCY = 4
MAX_LOCAL_CONCURRENCY = 64
"""The embedded engine runs every worker on one machine, at most twice its cores at once in
processes: past a few dozen they only queue for its cores and its memory (docs/engine.md)."""


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

    def __init__(self, stream: TextIO, *, api_url: str = "") -> None:
        self.stream = stream
        self.api_url = api_url
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self.last = ""
        self.view_shown = False

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
        # While the statistics passes run, the bar follows the pass under way.
        under_way = view.pass_under_way()
        progress = under_way[1] if under_way else view.progress
        done, total = (progress.done, progress.total) if progress else (0, 0)
        self.update(view.job.status.value, done, total)

    def on_document(self, job: Any) -> None:
        """From the API's status document; the job page's link is printed once, first."""
        view = (job.get("links") or {}).get("view")
        if view and not self.view_shown:
            self.view_shown = True
            # The API's links are root-relative; a browser needs the whole address.
            self.stream.write(f"watch it in a browser: {urljoin(self.api_url + '/', view)}\n")
            self.stream.flush()
        running = [p for p in job.get("statistics") or [] if p["done"] < p["total"]]
        tiles = (running[0] if running and job["status"] == "STATISTICS" else None) or (
            job.get("tiles") or {}
        )
        self.update(str(job["status"]), int(tiles.get("done", 0)), int(tiles.get("total", 0)))

    def close(self) -> None:
        """End the line the bar was drawn on."""
        if self.enabled and self.last:
            self.stream.write("\n")


def _chain(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The steps of --ops-file then --op, validated here so run and submit word errors alike."""
    if not args.ops_file and not args.op:
        raise NoOperations(
            "no --op or --ops-file: give at least one step (an --ops-file holding [] "
            "re-encodes the input unchanged)"
        )
    steps: list[dict[str, Any]] = _ops_file(Path(args.ops_file)) if args.ops_file else []
    steps.extend(args.op or [])
    return parse_chain(steps).to_json()


def _ops_file(path: Path) -> list[dict[str, Any]]:
    try:
        steps = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InvalidOpsFile(f"--ops-file {path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidOpsFile(f"--ops-file {path}: cannot be read ({e})") from e
    except json.JSONDecodeError as e:
        raise InvalidOpsFile(f"--ops-file {path}: not JSON ({e})") from e
    if not isinstance(steps, list):
        raise InvalidOpsFile(
            f'--ops-file {path}: must hold a JSON list of steps like {{"op": "invert"}}'
        )
    return steps


def _job_files(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The input, the output and the output format a run or submit names, checked."""
    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        raise InputMissing(f"{source} is not a file")
    named_format = format_for_path(output)
    output_format = args.format or named_format
    if output_format is None:
        raise UnknownFormat(
            f"cannot tell the format from {output.name!r}; pass --format "
            f"({', '.join(OUTPUT_FORMATS)})"
        )
    _check_writable(output, folder_allowed=output_format == "iiif")
    return source, output, output_format


def _check_writable(output: Path, *, folder_allowed: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done for it.

    An IIIF set is a folder: ``output`` may be one already, and is filled.
    """
    folder = output.parent
    if output.is_dir() and not folder_allowed:
        raise OutputUnwritable(f"{output} is a directory; name a file")
    if folder_allowed and output.exists() and not output.is_dir():
        raise OutputUnwritable(f"{output} is a file; name a folder for the IIIF tile set")
    if not folder.is_dir():
        raise OutputUnwritable(f"{folder} does not exist; create it or name another folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputUnwritable(f"{folder} is not writable")
    if output.exists() and not os.access(output, os.W_OK):
        raise OutputUnwritable(f"{output} exists and is not writable")


def _concurrency(text: str) -> int:
    """--concurrency, checked before the engine starts."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LOCAL_CONCURRENCY:
        raise InvalidConcurrency(
            f"--concurrency must be a whole number from 1 to {MAX_LOCAL_CONCURRENCY}, got {text!r}"
        )
    return value


def _service_name() -> str:
    """The handlers' Powertools service name, from the template they are deployed with."""
    from tilefan.local.template import load_template

    environment = load_template(Path(__file__).resolve().parent.parent).environment()
    return environment.get("POWERTOOLS_SERVICE_NAME", "service_undefined")


def _run_locally(
    source: Path,
    output: Path,
    chain: Any,
    output_format: str,
    args: argparse.Namespace,
    output_options: dict[str, Any] | None = None,
) -> JobView:
    """One job on a fresh embedded engine, with the progress bar on a terminal."""
    from tilefan.local.stack import local_stack, run_job

    route_handler_logs(_service_name(), verbose=args.verbose)
    progress = _Progress(sys.stderr)
    # The functions in processes of their own, as Lambda runs them; the pipeline's start warm
    # while the engine starts (docs/engine.md).
    warm = {"SplitterFunction": 1, "TileWorkerFunction": args.concurrency, "MergerFunction": 1}
    with local_stack(processes=True, warm=warm, function_logs=args.verbose) as stack:
        view = run_job(
            stack,
            source,
            output,
            chain,
            output_format=output_format,
            tile_size=args.tile_size,
            concurrency=args.concurrency,
            output_options=output_options,
            on_progress=progress.on_view if progress.enabled else None,
        )
    progress.close()
    return view


def _run(args: argparse.Namespace) -> int:
    source, output, output_format = _job_files(args)
    options = _output_options(args, output_format)
    view = _run_locally(source, output, _chain(args), output_format, args, options)
    return _report(view, output, quiet=args.quiet)


def _report(view: JobView, output: Path, *, quiet: bool) -> int:
    job = view.job
    if job.status is not JobStatus.SUCCEEDED:
        error = job.error or {"code": job.status.value, "message": "the job did not finish"}
        fail(error["code"], error["message"])
        return 1
    if not quiet:
        timings = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in job.timings.items())
        assert job.output is not None
        print(
            f"{output} ({job.output['width']}x{job.output['height']}, "
            f"{job.output['size_bytes']:,} bytes); {timings}"
        )
    return 0


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

    route_handler_logs(_service_name(), verbose=args.verbose)
    data_dir = None if args.ephemeral else Path(args.data_dir or default_data_dir())
    # SIGTERM stops the server as Ctrl-C does, so the data directory is saved either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.ExitStack() as running:
        try:
            api = running.enter_context(
                serve_api(
                    host=args.host,
                    port=args.port,
                    keys=args.key or (),
                    api_processes=args.api_processes,
                    data_dir=data_dir,
                    function_logs=args.verbose,
                )
            )
        except OSError as e:
            where = f"{args.host}:{args.port}"
            raise CannotListen(f"cannot listen on {where}: {e.strerror or e}") from e
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
        print("each job's document links its page (links.view): open it in a browser")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping" + ("" if api.data_dir is None else ": saving the data directory"))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from tilefan.service.client import TilefanClient

    source, output, output_format = _job_files(args)
    if output_format in ("dzi", "iiif"):
        raise NotOneFile(
            f"submit downloads one file, and a {output_format} result is a folder of tiles "
            "under the job's result prefix: name the output .zip for DeepZoom in one zip, "
            "or use tilefan run"
        )
    chain = _chain(args)
    progress = _Progress(sys.stderr, api_url=args.api)
    client = TilefanClient(args.api, args.key)
    try:
        done = client.submit(
            source,
            output,
            chain,
            output_format=output_format,
            tile_size=args.tile_size,
            on_progress=progress.on_document,
            poll_seconds=args.poll,
        )
    finally:
        progress.close()
    if not args.quiet:
        result = done.job["output"]
        print(f"{output} ({result['width']}x{result['height']}); job {done.job['job_id']}")
    return 0


def _bench(argv: Sequence[str]) -> int:
    # The harness lives beside the package in a checkout (benchmarks/), not in the wheel.
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "cli.py").is_file():
        raise NoBenchmarks(f"no benchmarks/ beside {root / 'tilefan'}: use a checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # Imported by name: the harness is a tool beside the core, outside its type-checked API.
    harness = importlib.import_module("benchmarks.cli")
    return int(harness.main(argv))


_OP_HELP = "a step, e.g. gaussblur:sigma=4 (repeat for a chain)"
_OPS_FILE_HELP = "a JSON file with a list of steps (run before --op); [] re-encodes only"
_FORMAT_HELP = (
    "the output format (default: from the output's extension; .zip is dz, .dzi a DeepZoom "
    "tile set beside its _files folder; iiif fills the folder named by -o)"
)
_VERBOSE_HELP = "also print the Lambda handlers' logs (on stderr)"


def _epilog() -> str:
    """What every job-running subcommand's --help ends with: the operations and the defaults."""
    return (
        f"operations: {', '.join(operation_names())} (docs/operations.md). "
        "Without --op or --ops-file the command refuses (NO_OPERATIONS). "
        "On failure: exit status 1 (2 for a wrong command line) and one line on stderr, "
        "'error: CODE: sentence'. A jpeg result is at most 65,535 px a side, a webp one "
        "16,383; a result the merger could not encode within its memory or timeout is refused "
        "before the job starts (OUTPUT_TOO_LARGE)."
    )


def _tile_size_help() -> str:
    default = Settings.model_fields["tile_size"].default
    return f"tile edge in pixels, {MIN_TILE_SIZE} to {MAX_TILE_SIZE} (default: {default})"


def _add_concurrency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default=DEFAULT_CONCURRENCY,
        help=f"tile workers at once, 1 to {MAX_LOCAL_CONCURRENCY} (default: {DEFAULT_CONCURRENCY})",
    )


# The API's choices: the field is `Literal[...] | None`.
_COMPRESSIONS = get_args(get_args(OutputSpec.model_fields["compression"].annotation)[0])
_SUFFIXES = get_args(get_args(OutputSpec.model_fields["suffix"].annotation)[0])


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"quality must be from 1 to 100, got {value}")
    return value


def _output_options(args: argparse.Namespace, output_format: str) -> dict[str, Any]:
    """The output options of a run, checked as the API checks them."""
    tileset = {
        "tile_size": args.dz_tile_size,
        "overlap": args.overlap,
        "suffix": args.suffix,
        "iiif_id": args.iiif_id,
    }
    if output_format in TILESET_FORMATS:
        TileSetLayout.from_options(
            output_format, {**tileset, "quality": args.quality}
        )  # its sentence, before the schema's bounds
    return OutputSpec(
        format=output_format,  # type: ignore[arg-type]  # checked by _job_files
        preview=False,  # no job page shows a run's result
        compression=args.compression,
        pyramid=args.pyramid,
        quality=args.quality,
        lossless=args.lossless,
        **tileset,
    ).options()


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tilefan", description=__doc__, epilog=_epilog())
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one job on the embedded engine", epilog=_epilog())
    run.add_argument("input")
    run.add_argument("-o", "--output", required=True)
    run.add_argument(
        "--op",
        action="append",
        type=parse_op,
        metavar="NAME[:key=value,...]",
        help=_OP_HELP,
    )
    run.add_argument("--ops-file", help=_OPS_FILE_HELP)
    run.add_argument("--tile-size", type=int, default=None, help=_tile_size_help())
    _add_concurrency(run)
    run.add_argument("--format", choices=sorted(OUTPUT_FORMATS), help=_FORMAT_HELP)
    run.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    run.add_argument(
        "-q", "--quiet", action="store_true", help="no summary line (output and stage timings)"
    )
    run.add_argument(
        "--compression", choices=_COMPRESSIONS, help="tiff only (default: deflate, lossless)"
    )
    run.add_argument("--pyramid", action="store_true", help="tiff only: add reduced levels")
    run.add_argument(
        "--quality",
        type=_quality,
        help="jpeg and webp, 1 to 100 (default: 90); jpeg or webp tiles of a tile set "
        "(default: 75, as dzsave)",
    )
    run.add_argument("--lossless", action="store_true", help="webp only")
    run.add_argument(
        "--dz-tile-size",
        type=int,
        help="dz, dzi and iiif: the tiles' edge, even (default: 254 for DeepZoom, 512 for IIIF)",
    )
    run.add_argument(
        "--overlap", type=int, help="dz and dzi: pixels a tile shares with each neighbour (1)"
    )
    run.add_argument(
        "--suffix", choices=_SUFFIXES, help="dz, dzi and iiif: the tiles' encoding (jpeg)"
    )
    run.add_argument(
        "--iiif-id",
        help="iiif: the URL the set will be served from, less its last part: info.json's id "
        "is this followed by /result (default: https://example.com/iiif, as dzsave)",
    )
    run.set_defaults(func=_run)

    demo = commands.add_parser("demo", help="make a synthetic image and run a chain on it")
    demo.add_argument("--megapixels", type=float, default=100, help="(default: 100)")
    demo.add_argument("--tile-size", type=int, default=1024, help=_tile_size_help())
    _add_concurrency(demo)
    demo.add_argument("--workdir", help="where to put the input and the result")
    demo.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    demo.set_defaults(func=_demo)

    serve = commands.add_parser("serve", help="serve the REST API locally on the embedded engine")
    serve.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="(default: 8080)")
    serve.add_argument("--key", action="append", help="an API key to accept (repeatable)")
    serve.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
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
        help=(
            "API worker processes, each answering one request at a time (default 4); the "
            "other functions run in processes of their own too. 0 runs every function in "
            "the server's process"
        ),
    )
    serve.set_defaults(func=_serve)

    submit = commands.add_parser(
        "submit", help="run one job through a deployed or local API", epilog=_epilog()
    )
    submit.add_argument("input")
    submit.add_argument("-o", "--output", required=True)
    submit.add_argument("--api", required=True, help="the API's base URL")
    submit.add_argument("--key", help="the API key (x-api-key)")
    submit.add_argument(
        "--op", action="append", type=parse_op, metavar="NAME[:key=value,...]", help=_OP_HELP
    )
    submit.add_argument("--ops-file", help=_OPS_FILE_HELP)
    submit.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="tile edge in pixels (default: the deployment's, 1024 unless configured)",
    )
    submit.add_argument("--format", choices=sorted(OUTPUT_FORMATS), help=_FORMAT_HELP)
    submit.add_argument(
        "--poll", type=float, default=1.0, help="seconds between status polls (default: 1.0)"
    )
    submit.add_argument(
        "-q", "--quiet", action="store_true", help="no summary line (output and job id)"
    )
    submit.set_defaults(func=_submit)

    # Listed for --help; main() hands everything after "bench" to the harness untouched.
    commands.add_parser(
        "bench", help="the benchmark harness, from a checkout (tilefan bench --help)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tilefan` console script: every failure is one line with a code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return guarded(lambda: _bench(arguments[1:]))
    return guarded(lambda: _dispatch(arguments))


def _dispatch(arguments: list[str]) -> int:
    args = _parser().parse_args(arguments)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
