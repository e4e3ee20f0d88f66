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

from tilefan.errors import TilefanError
from tilefan.service.job_service import JobService
from tilefan.service.progress_svg import render_progress_svg
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
from tilefan.state.jobs import JobRepository, TileState
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
    "INPUT_TOO_LARGE": 413,
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


def _base_url() -> str:
    """Scheme, host and stage prefix as the client called us."""
    event = app.current_event
    headers = {name.lower(): value for name, value in (event.headers or {}).items()}
    scheme = headers.get("x-forwarded-proto", "https")
    host = headers.get("host", "localhost")
    stage_path = event.request_context.path or event.path
    prefix = (
        stage_path[: len(stage_path) - len(event.path)] if stage_path.endswith(event.path) else ""
    )
    return f"{scheme}://{host}{prefix}"


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
    return _error(400, "INVALID_REQUEST", f"{field or 'request'}: {problem.get('msg')}", field)


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
        job_id=job.job_id, status=job.status, links=links(base, job.job_id), **instructions
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
    owner, base = _owner(), _base_url()
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
    document = job_document(view.job, view.progress, _base_url())
    return Response(
        status_code=202,
        content_type=content_types.APPLICATION_JSON,
        body=document.model_dump(mode="json"),
    )


@app.get("/jobs/<job_id>")
def get_job(job_id: Annotated[str, Path(max_length=64)]) -> JobDocument:
    """Status, stage, timings, error, output and per-tile progress."""
    view = service.view(_owner(), job_id)
    return job_document(view.job, view.progress, _base_url())


@app.get("/jobs/<job_id>/tiles")
def list_tiles(
    job_id: Annotated[str, Path(max_length=64)],
    state: Annotated[TileState | None, Query()] = None,
    limit: Annotated[int, _PAGE] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,6}$")] = None,
) -> TilePage:
    """Per-tile detail, by tile index, optionally only tiles in one state."""
    job = service.jobs.get(job_id, owner=_owner())
    if not job.grid:
        return TilePage(tiles=[])
    records = sorted(service.jobs.tiles(job_id), key=lambda record: record.index)
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
    svg = render_progress_svg(grid, columns, f"job {job_id}: {view.job.status.value}")
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
    document = job_document(cancelled, None, _base_url())
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
    base = _base_url()
    return JobPage(jobs=[job_document(job, None, base) for job in jobs], next_cursor=following)


@app.get("/openapi.json")
def openapi() -> Response[str]:
    """This API's OpenAPI document."""
    return Response(
        status_code=200,
        content_type=content_types.APPLICATION_JSON,
        body=app.get_openapi_json_schema(title="tilefan", version="1.0.0"),
    )


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
        body = ErrorBody(code="UNSUPPORTED_MEDIA_TYPE", message="send request bodies as JSON")
        return {
            "statusCode": 415,
            "headers": {"Content-Type": content_types.APPLICATION_JSON},
            "body": body.model_dump_json(exclude_none=True),
            "isBase64Encoded": False,
        }
    with _ONE_REQUEST_AT_A_TIME:
        return app.resolve(event, context)
