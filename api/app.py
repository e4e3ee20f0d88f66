"""API Lambda: the REST job API on Powertools' resolver. Routes map HTTP to `JobService`."""

from __future__ import annotations

import threading
from typing import Annotated, Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import (
    APIGatewayRestResolver,
    CORSConfig,
    Response,
    content_types,
)
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Body, Header, Path, Query
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyValidationError
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from tilefan.errors import InvalidChain, JobNotFound, TilefanError
from tilefan.imaging.operations import parse_chain
from tilefan.service.job_page import ViewedSet, ViewLinks, page_file
from tilefan.service.job_service import JobService
from tilefan.service.progress_svg import render_progress_svg
from tilefan.service.request_limits import MAX_JSON_DEPTH, nests_too_deep
from tilefan.service.schema import (
    CompleteUploadRequest,
    CreateJobRequest,
    DeletedJob,
    ErrorBody,
    JobCreated,
    JobDocument,
    JobPage,
    ResultLink,
    SignedParts,
    SignPartsRequest,
    TilePage,
    UploadPart,
    job_document,
    links,
    tile_document,
)
from tilefan.settings import Settings
from tilefan.state.jobs import Job, JobRepository, JobStatus, TileState
from tilefan.state.storage import TileStore

logger = Logger()
settings = Settings()
_origins = [origin.strip() for origin in settings.cors_allowed_origins.split(",") if origin.strip()]
# Web pages on these origins may call the API; the resolver answers their preflight OPTIONS,
# which API Gateway lets through without an API key (template.yaml, Preflight).
app = APIGatewayRestResolver(
    enable_validation=True,
    cors=CORSConfig(
        allow_origin=_origins[0] if _origins else "*",
        extra_origins=_origins[1:],
        allow_headers=["x-api-key", "Idempotency-Key"],
        expose_headers=["Location"],
        max_age=3600,
    ),
)
service = JobService(
    settings,
    jobs=JobRepository(settings.table, resource=boto3.resource("dynamodb")),
    store=TileStore(
        settings.bucket, client=boto3.client("s3", config=Config(signature_version="s3v4"))
    ),
    stepfunctions=boto3.client("stepfunctions"),
    functions=boto3.client("lambda"),
)
view_links = (
    ViewLinks(settings.view_secret.encode(), settings.view_link_seconds)
    if settings.view_secret
    else None
)
idempotency_store = DynamoDBPersistenceLayer(
    table_name=settings.table,
    key_attr="pk",
    sort_key_attr="sk",
    static_pk_value="IDEMPOTENCY#create-job",
    expiry_attr="expires_at",
)
idempotency = IdempotencyConfig(
    event_key_jmespath="[owner, key]",
    payload_validation_jmespath="body",
    expires_after_seconds=86_400,
)

_STATUS_BY_CODE = {
    "INVALID_CHAIN": 400,
    "INVALID_REQUEST": 400,
    "INVALID_TILE_SIZE": 400,
    "INVALID_TILE_SET": 400,
    "INPUT_TOO_LARGE": 413,
    "OUTPUT_TOO_LARGE": 400,
    "JOB_NOT_FOUND": 404,
    "UPLOAD_MISSING": 409,
    "UPLOAD_MISMATCH": 409,
    "ALREADY_STARTED": 409,
    "RESULT_NOT_READY": 409,
    "INVALID_STATE": 409,
}
_PAGE = Query(ge=1, le=500)
_ONE_REQUEST_AT_A_TIME = threading.Lock()
"""The resolver keeps the request it is answering (event, route arguments) on the class, so
two requests at once would read each other's caller and job id. Lambda gives a process one
request at a time; `tilefan serve` calls this handler from many threads."""


class MissingCaller(TilefanError):
    """The request carries no API key or IAM principal, so it has no owner."""

    code = "UNAUTHORIZED"


def _error(status: int, code: str, message: str, field: str | None = None) -> Response[Any]:
    body = ErrorBody(code=code, message=message, field=field).model_dump(exclude_none=True)
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=body)


def _owner() -> str:
    """The caller: the API key's id behind API Gateway, or the IAM principal."""
    identity = app.current_event.request_context.identity
    owner = identity.api_key_id or identity.user_arn
    if not owner:
        raise MissingCaller("send your API key in the x-api-key header")
    return owner


def _link_prefix() -> str:
    """The stage prefix the client called (``/Prod``, or nothing): links are root-relative.

    Never the Host header: a client chooses it, so it would choose where our links point.
    API Gateway puts the path as called, stage included, in the request context.
    """
    event = app.current_event
    stage_path = event.request_context.path or event.path
    if not stage_path.endswith(event.path):
        return ""
    return stage_path[: len(stage_path) - len(event.path)]


@app.not_found
def _no_route(error: Exception) -> Response[Any]:
    event = app.current_event
    return _error(404, "NOT_FOUND", f"no route {event.http_method} {event.path}")


@app.exception_handler(TilefanError)
def _tilefan_error(error: TilefanError) -> Response[Any]:
    status = 401 if isinstance(error, MissingCaller) else _STATUS_BY_CODE.get(error.code, 500)
    if status == 500:
        logger.exception("unexpected domain error")
        return _error(500, "INTERNAL_ERROR", "the request failed on our side; try again later")
    return _error(status, error.code, str(error))


@app.exception_handler(RequestValidationError)
def _invalid_request(error: RequestValidationError) -> Response[Any]:
    problem = error.errors()[0]
    location = [str(part) for part in problem.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    if problem.get("type") == "json_invalid":
        return _error(400, "BAD_JSON", "the request body is not valid JSON")
    if location[:1] == ["operations"]:
        chain_error = _chain_error()
        if chain_error is not None:
            return _error(400, chain_error.code, str(chain_error), field)
    # A field validator's ValueError reaches here as "Value error, <its sentence>".
    sentence = str(problem.get("msg", "")).removeprefix("Value error, ")
    return _error(400, "INVALID_REQUEST", f"{field or 'request'}: {sentence}", field)


def _chain_error() -> InvalidChain | None:
    """The chain validator's own sentence for the body's operations, as the CLI words it."""
    try:
        parse_chain((app.current_event.json_body or {}).get("operations"))
    except InvalidChain as e:
        return e
    return None


@app.exception_handler(IdempotencyValidationError)
def _idempotency_reused(error: IdempotencyValidationError) -> Response[Any]:
    return _error(
        422, "IDEMPOTENCY_KEY_REUSED", "this Idempotency-Key was used with a different request"
    )


@app.exception_handler(Exception)
def _unexpected(error: Exception) -> Response[Any]:
    logger.exception("unhandled error")
    return _error(500, "INTERNAL_ERROR", "the request failed on our side; try again later")


def _create(request: dict[str, Any]) -> dict[str, Any]:
    """Create the job and its upload instructions; a retried request returns the same answer."""
    body = CreateJobRequest.model_validate(request["body"])
    job = service.create(
        request["owner"],
        [step.model_dump(mode="json") for step in body.operations],
        body.output.format,
        tile_size=body.tile_size,
        output_options=body.output.options(),
        input_info=body.input.model_dump(),
    )
    instructions = service.upload_instructions(job)
    base = request["base"]
    if "multipart" in instructions:
        instructions["multipart"]["complete_url"] = f"{base}/jobs/{job.job_id}/upload/complete"
        instructions["multipart"]["parts_url"] = f"{base}/jobs/{job.job_id}/upload/parts"
    created = JobCreated(
        job_id=job.job_id,
        status=job.status,
        links=links(base, job.job_id, view_token=_view_token(job.job_id, request["owner"])),
        **instructions,
    )
    return created.model_dump(mode="json", exclude_none=True)


_create_once = idempotent_function(
    data_keyword_argument="request", persistence_store=idempotency_store, config=idempotency
)(_create)


@app.post("/jobs", responses={201: {"description": "created"}})
def create_job(
    body: Annotated[CreateJobRequest, Body()],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Response[JobCreated]:
    """Create a job and get where to upload its image."""
    owner, base = _owner(), _link_prefix()
    request = {"owner": owner, "body": body.model_dump(mode="json"), "base": base}
    if idempotency_key:
        created = _create_once(request={**request, "key": idempotency_key})
    else:
        created = _create(request)
    return Response(
        status_code=201,
        content_type=content_types.APPLICATION_JSON,
        body=created,
        headers={"Location": f"{base}/jobs/{created['job_id']}"},
    )


@app.post("/jobs/<job_id>/upload/parts")
def sign_parts(
    job_id: Annotated[str, Path(max_length=64)], body: Annotated[SignPartsRequest, Body()]
) -> SignedParts:
    """Sign URLs for parts of a multipart upload, shortly before uploading them."""
    parts, expires_at = service.sign_parts(_owner(), job_id, body.part_numbers)
    return SignedParts(parts=[UploadPart(**part) for part in parts], expires_at=expires_at)


@app.post("/jobs/<job_id>/upload/complete")
def complete_upload(
    job_id: Annotated[str, Path(max_length=64)], body: Annotated[CompleteUploadRequest, Body()]
) -> dict[str, str]:
    """Finish a multipart upload with the ETags of its parts."""
    service.complete_upload(_owner(), job_id, [part.model_dump() for part in body.parts])
    return {"job_id": job_id, "upload": "complete"}


@app.post("/jobs/<job_id>/start")
def start_job(
    job_id: Annotated[str, Path(max_length=64)],
    max_concurrency: Annotated[int | None, Query(ge=1, le=10_000)] = None,
) -> Response[JobDocument]:
    """Check the upload and start processing; a job starts once."""
    service.start(_owner(), job_id, max_concurrency=max_concurrency)
    view = service.view(_owner(), job_id)
    document = job_document(view.job, view.progress, _link_prefix(), passes=view.passes)
    return Response(
        status_code=202,
        content_type=content_types.APPLICATION_JSON,
        body=document.model_dump(mode="json"),
    )


@app.get("/jobs/<job_id>")
def get_job(job_id: Annotated[str, Path(max_length=64)]) -> JobDocument:
    """Status, stage, timings, error, output and per-tile progress."""
    owner = _owner()
    view = service.view(owner, job_id)
    return job_document(
        view.job,
        view.progress,
        _link_prefix(),
        view_token=_view_token(job_id, owner),
        passes=view.passes,
    )


@app.get("/jobs/<job_id>/tiles")
def list_tiles(
    job_id: Annotated[str, Path(max_length=64)],
    state: Annotated[TileState | None, Query()] = None,
    limit: Annotated[int, _PAGE] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,6}$")] = None,
) -> TilePage:
    """Per-tile detail, by tile index, optionally only tiles in one state."""
    return _tile_page(service.jobs.get(job_id, owner=_owner()), state, limit, cursor)


def _tile_page(job: Job, state: TileState | None, limit: int, cursor: str | None) -> TilePage:
    if not job.grid:
        return TilePage(tiles=[])
    records = service.jobs.tiles(job.job_id, int(job.grid["tile_count"]))
    if state is not None:
        records = [record for record in records if record.state is state]
    start = int(cursor or 0)
    page = records[start : start + limit]
    following = str(start + limit) if start + limit < len(records) else None
    columns = int(job.grid["columns"])
    return TilePage(tiles=[tile_document(r, columns) for r in page], next_cursor=following)


@app.get("/jobs/<job_id>/progress.svg")
def progress_svg(job_id: Annotated[str, Path(max_length=64)]) -> Response[str]:
    """The tile grid as a picture: one cell per tile, coloured by state."""
    view = service.view(_owner(), job_id)
    grid = view.progress.grid if view.progress else ""
    columns = int((view.job.grid or {}).get("columns", 1))
    title = f"job {job_id}: {view.job.status.value}"
    under_way = view.pass_under_way()  # while the statistics passes run, the pass's grid
    if under_way is not None:
        grid, columns = under_way[1].grid, int(under_way[0]["columns"])
        title += f": statistics pass before step {under_way[0]['upto']}"
    svg = render_progress_svg(grid, columns, title)
    return Response(status_code=200, content_type="image/svg+xml", body=svg)


@app.get(
    "/jobs/<job_id>/result",
    responses={
        200: {
            "description": "the download link (redirect=false)",
            "content": {"application/json": {"model": ResultLink}},
        },
        302: {"description": "redirect to the download link"},
    },
)
def get_result(
    job_id: Annotated[str, Path(max_length=64)],
    redirect: Annotated[bool, Query()] = True,
) -> Response[Any]:
    """Redirect to a short-lived download URL of the result (or return it with redirect=false)."""
    url, expires_at = service.result_url(_owner(), job_id)
    if redirect:
        return Response(status_code=302, headers={"Location": url}, body="")
    return Response(
        status_code=200,
        content_type=content_types.APPLICATION_JSON,
        body=ResultLink(url=url, expires_at=expires_at).model_dump(),
    )


@app.delete(
    "/jobs/<job_id>",
    responses={
        202: {
            "description": "the running job was cancelled",
            "content": {"application/json": {"model": JobDocument}},
        },
        200: {
            "description": "the ended job and its objects were deleted",
            "content": {"application/json": {"model": DeletedJob}},
        },
    },
)
def delete_job(job_id: Annotated[str, Path(max_length=64)]) -> Response[Any]:
    """Cancel a running job, or delete an ended one with its objects."""
    cancelled = service.delete(_owner(), job_id)
    if cancelled is None:
        return Response(
            status_code=200,
            content_type=content_types.APPLICATION_JSON,
            body=DeletedJob(job_id=job_id).model_dump(),
        )
    document = job_document(cancelled, None, _link_prefix())
    return Response(
        status_code=202,
        content_type=content_types.APPLICATION_JSON,
        body=document.model_dump(mode="json"),
    )


@app.get("/jobs")
def list_jobs(
    limit: Annotated[int, _PAGE] = 20,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> JobPage:
    """The caller's jobs, newest first."""
    jobs, following = service.jobs.list_for_owner(_owner(), limit=limit, after=cursor)
    base = _link_prefix()
    return JobPage(jobs=[job_document(job, None, base) for job in jobs], next_cursor=following)


def _view_token(job_id: str, owner: str) -> str | None:
    return view_links.token(job_id, owner) if view_links else None


def _viewed(job_id: str, token: str) -> Job:
    """The job a page link opens; any other link is answered as if the job did not exist."""
    job = service.jobs.get(job_id)
    if view_links is None or not view_links.opens(token, job_id, job.owner):
        raise JobNotFound(f"job {job_id} was not found")
    return job


_TOKEN = Query(min_length=1, max_length=200)
_PAGE_HEADERS = {
    # The page loads only its own files; the result preview may come from storage.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data: https: http:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@app.get("/jobs/<job_id>/view", include_in_schema=False)
def job_page(
    job_id: Annotated[str, Path(max_length=64)], token: Annotated[str, _TOKEN]
) -> Response[str]:
    """The job's page: live tile grid, stages, and the result (the link is the credential)."""
    _viewed(job_id, token)
    return _page_file("job.html")


@app.get("/jobs/<job_id>/view/static/<name>", include_in_schema=False)
def job_page_file(job_id: Annotated[str, Path(max_length=64)], name: str) -> Response[str]:
    """The page's own CSS, script and viewer: public files, the same for every job."""
    return _page_file(name)


def _page_file(name: str) -> Response[str]:
    found = page_file(name)
    if found is None:
        raise JobNotFound(f"no page file {name}")
    content_type, text = found
    return Response(status_code=200, content_type=content_type, body=text, headers=_PAGE_HEADERS)


@app.get("/jobs/<job_id>/view/state", include_in_schema=False)
def job_page_state(
    job_id: Annotated[str, Path(max_length=64)], token: Annotated[str, _TOKEN]
) -> JobDocument:
    """The job document, for the page."""
    job = _viewed(job_id, token)
    view = service.view(job.owner, job_id)
    return job_document(
        view.job, view.progress, _link_prefix(), view_token=token, passes=view.passes
    )


@app.get("/jobs/<job_id>/view/tiles", include_in_schema=False)
def job_page_tiles(
    job_id: Annotated[str, Path(max_length=64)],
    token: Annotated[str, _TOKEN],
    limit: Annotated[int, _PAGE] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,6}$")] = None,
) -> TilePage:
    """Per-tile detail, for the page's hover and heat maps."""
    return _tile_page(_viewed(job_id, token), None, limit, cursor)


@app.post("/jobs/<job_id>/view/cancel", include_in_schema=False)
def job_page_cancel(
    job_id: Annotated[str, Path(max_length=64)], token: Annotated[str, _TOKEN]
) -> Response[Any]:
    """The page's cancel button."""
    job = service.cancel(_viewed(job_id, token).owner, job_id)
    body = job_document(job, None, _link_prefix(), view_token=token).model_dump(mode="json")
    return Response(status_code=202, content_type=content_types.APPLICATION_JSON, body=body)


@app.get("/jobs/<job_id>/view/result", include_in_schema=False)
def job_page_result(
    job_id: Annotated[str, Path(max_length=64)], token: Annotated[str, _TOKEN]
) -> Response[Any]:
    """Redirect to the result's short-lived download URL, for the viewer and the button."""
    url, _ = service.result_url(_viewed(job_id, token).owner, job_id)
    return Response(status_code=302, headers={"Location": url}, body="")


def _viewed_set(job_id: str, token: str) -> ViewedSet:
    job = _viewed(job_id, token)
    found = ViewedSet.of(job) if job.status is JobStatus.SUCCEEDED else None
    if found is None:
        raise JobNotFound(f"job {job_id} has no tile set to view")
    return found


@app.get("/jobs/<job_id>/view/set", include_in_schema=False)
def job_page_set(
    job_id: Annotated[str, Path(max_length=64)], token: Annotated[str, _TOKEN]
) -> dict[str, Any]:
    """The size and layout of the tile set the page's viewer shows."""
    return _viewed_set(job_id, token).viewer_source()


@app.get("/jobs/<job_id>/view/set/<level>/<column>/<row>", include_in_schema=False)
def job_page_set_tile(
    job_id: Annotated[str, Path(max_length=64)],
    level: Annotated[int, Path(ge=0, le=64)],
    column: Annotated[int, Path(ge=0, le=1_000_000)],
    row: Annotated[int, Path(ge=0, le=1_000_000)],
    token: Annotated[str, _TOKEN],
):  # no return type: the response validator would read the bytes as text
    """One tile of the set, its bytes through the API: the page loads nothing from elsewhere.

    Powertools answers bytes base64-encoded; API Gateway turns them back into binary for a
    browser that accepts ``image/*`` (the API's ``BinaryMediaTypes``).
    """
    tile_set = _viewed_set(job_id, token)
    key = tile_set.tile_key(level, column, row)
    if key is None:
        raise JobNotFound(f"the set of job {job_id} has no tile {level}/{column}/{row}")
    return Response(
        status_code=200,
        content_type=tile_set.layout.content_type,
        body=service.store.get_bytes(key),
        headers={"Cache-Control": "private, max-age=3600", **_PAGE_HEADERS},
    )


@app.get("/openapi.json")
def openapi() -> Response[str]:
    """This API's OpenAPI document."""
    return Response(
        status_code=200,
        content_type=content_types.APPLICATION_JSON,
        body=app.get_openapi_json_schema(title="tilefan", version="1.0.0"),
    )


def _refusal(status: int, code: str, message: str) -> dict[str, Any]:
    """A proxy response refusing a request before the resolver reads it."""
    return {
        "statusCode": status,
        "headers": {"Content-Type": content_types.APPLICATION_JSON},
        "body": ErrorBody(code=code, message=message).model_dump_json(exclude_none=True),
        "isBase64Encoded": False,
    }


def _sends_non_json(event: dict[str, Any]) -> bool:
    """A body in any other type than JSON: the resolver would try to parse it as a form."""
    headers = {name.lower(): value for name, value in (event.get("headers") or {}).items()}
    kind = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    return bool(event.get("body")) and kind != "application/json"


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """API Gateway REST proxy event in, proxy response out."""
    idempotency.register_lambda_context(context)
    if _sends_non_json(event):
        return _refusal(415, "UNSUPPORTED_MEDIA_TYPE", "send request bodies as JSON")
    if nests_too_deep(event.get("body") or ""):
        # The resolver's parser and validators recurse: a deep body would end in RecursionError.
        message = f"the request body is not valid JSON nested at most {MAX_JSON_DEPTH} levels"
        return _refusal(400, "BAD_JSON", message)
    with _ONE_REQUEST_AT_A_TIME:
        return app.resolve(event, context)
