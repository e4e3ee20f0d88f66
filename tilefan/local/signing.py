"""The engine's credentials, and moto's server refusing requests not signed with them.

moto's server answers whoever asks: unsigned requests, made-up keys and presigned URLs whose key,
method or expiry were changed. AWS checks a SigV4 signature on every request, so the engine does
too, in a WSGI middleware in front of moto: it rebuilds the request as the client signed it and
has botocore's own signers (``SigV4Auth``, ``S3SigV4Auth``, ``S3SigV4QueryAuth``) compute the
signature the engine's secret gives, then compares. Refusals carry the error each service sends:
S3's XML (``AccessDenied``, ``SignatureDoesNotMatch``, ``InvalidAccessKeyId``,
``RequestTimeTooSkewed``, "Request has expired") and the JSON protocols' ``__type``
(``MissingAuthenticationTokenException``, ``UnrecognizedClientException``,
``InvalidSignatureException``).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import io
import json
import re
import secrets
import string
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

__all__ = ["EngineCredentials", "SignatureCheck", "sign_interpreter_clients", "signed_request"]

_ALGORITHM: Final = "AWS4-HMAC-SHA256"
_TIMESTAMP_FORMAT: Final = "%Y%m%dT%H%M%SZ"
_MAX_SKEW_SECONDS: Final = 15 * 60
"""How far a header-signed request's X-Amz-Date may be from the server's clock (S3: 15 min)."""
_MAX_EXPIRES_SECONDS: Final = 7 * 24 * 3600
"""The longest X-Amz-Expires SigV4 allows."""
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed_headers>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]+)\s*$"
)
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EngineCredentials:
    """The one key pair the engine's endpoints accept: random for each engine start."""

    access_key: str
    secret_key: str

    @classmethod
    def generate(cls) -> EngineCredentials:
        """A fresh pair shaped like an IAM user's keys."""
        alphabet = string.ascii_uppercase + "234567"
        access_key = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
        return cls(access_key, secrets.token_urlsafe(30))

    def botocore(self) -> Credentials:
        """The pair as botocore's signers take it."""
        return Credentials(self.access_key, self.secret_key)


class _Refusal(Exception):
    """A request the engine refuses: the error code, its message and the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 403, **extra: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra


@dataclass(frozen=True)
class _Signature:
    """What a request says about its signature, from its Authorization header or its query."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str
    timestamp: str
    presigned: bool
    expires: int = 0


class _ExactHeaders:
    """A signer mixin: sign exactly the headers the client listed in SignedHeaders."""

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        header_map = HTTPHeaders()
        for name, value in request.headers.items():
            header_map[name.lower()] = value
        return header_map


class _HeaderSigner(_ExactHeaders, SigV4Auth):
    pass


class _S3HeaderSigner(_ExactHeaders, S3SigV4Auth):
    pass


class _QuerySigner(_ExactHeaders, SigV4QueryAuth):
    pass


class _S3QuerySigner(_ExactHeaders, S3SigV4QueryAuth):
    pass


class SignatureCheck:
    """WSGI middleware: only requests signed with the engine's credentials reach moto."""

    def __init__(
        self,
        app: WSGIApplication,
        credentials: EngineCredentials,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._app = app
        self._credentials = credentials
        self._clock = clock

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = _read_body(environ)
        try:
            self._verify(environ, body)
        except _Refusal as refusal:
            return _refuse(environ, refusal, start_response)
        return self._app(environ, start_response)

    def _verify(self, environ: WSGIEnvironment, body: bytes) -> None:
        claimed = _signature_of(environ)
        if claimed.access_key != self._credentials.access_key:
            raise _Refusal(
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
                AWSAccessKeyId=claimed.access_key,
            )
        now = self._clock()
        moment = calendar.timegm(time.strptime(claimed.timestamp, _TIMESTAMP_FORMAT))
        if claimed.presigned:
            if not 0 < claimed.expires <= _MAX_EXPIRES_SECONDS:
                raise _Refusal(
                    "AuthorizationQueryParametersError",
                    "X-Amz-Expires must be between 1 and 604800 seconds",
                    400,
                )
            if now > moment + claimed.expires:
                raise _Refusal(
                    "AccessDenied",
                    "Request has expired",
                    X_Amz_Expires=str(claimed.expires),
                    Expires=time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment + claimed.expires)
                    ),
                    ServerTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                )
            if moment > now + _MAX_SKEW_SECONDS:
                raise _Refusal("AccessDenied", "Request is not valid yet")
        elif abs(now - moment) > _MAX_SKEW_SECONDS:
            raise _Refusal(
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            )
        if claimed.date != claimed.timestamp[:8]:
            raise _Refusal(
                "AuthorizationHeaderMalformed",
                "The authorization header is malformed; the credential date does not match "
                "X-Amz-Date.",
                400,
            )
        expected = self._expected_signature(environ, body, claimed)
        if not hmac.compare_digest(expected, claimed.signature):
            raise _Refusal(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
            )
        declared = environ.get("HTTP_X_AMZ_CONTENT_SHA256", "")
        if _HEX_SHA256.fullmatch(declared) and declared != hashlib.sha256(body).hexdigest():
            raise _Refusal(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
                400,
            )

    def _expected_signature(
        self, environ: WSGIEnvironment, body: bytes, claimed: _Signature
    ) -> str:
        headers = {}
        for name in claimed.signed_headers:
            value = _header(environ, name)
            if value is None:
                raise _Refusal(
                    "SignatureDoesNotMatch",
                    f"The request signature we calculated does not match the signature you "
                    f"provided: the signed header {name} is missing.",
                )
            headers[name] = value
        path, _, query = _raw_target(environ).partition("?")
        if claimed.presigned:
            # The canonical query holds every parameter but the signature itself.
            query = "&".join(
                pair for pair in query.split("&") if not pair.startswith("X-Amz-Signature=")
            )
        url = f"http://{environ.get('HTTP_HOST', '')}{path}" + (f"?{query}" if query else "")
        request = AWSRequest(method=str(environ["REQUEST_METHOD"]), url=url, headers=headers)
        if not claimed.presigned:
            request.data = body
        request.context["timestamp"] = claimed.timestamp
        signer_class: type[SigV4Auth]
        if claimed.service == "s3":
            signer_class = _S3QuerySigner if claimed.presigned else _S3HeaderSigner
        else:
            signer_class = _QuerySigner if claimed.presigned else _HeaderSigner
        signer = signer_class(self._credentials.botocore(), claimed.service, claimed.region)
        canonical = signer.canonical_request(request)
        signature: str = signer.signature(signer.string_to_sign(request, canonical), request)
        return signature


def _signature_of(environ: WSGIEnvironment) -> _Signature:
    authorization = str(environ.get("HTTP_AUTHORIZATION", ""))
    query = dict(parse_qsl(str(environ.get("QUERY_STRING", "")), keep_blank_values=True))
    if authorization:
        match = _AUTHORIZATION.match(authorization)
        if match is None:
            raise _Refusal(
                "AccessDenied",
                "Only AWS4-HMAC-SHA256 authorization is accepted.",
                400 if not authorization.startswith("AWS") else 403,
            )
        credential = match["credential"]
        signed_headers = match["signed_headers"]
        signature = match["signature"]
        timestamp = str(environ.get("HTTP_X_AMZ_DATE", ""))
        presigned = False
        expires = "0"
    elif "X-Amz-Signature" in query:
        if query.get("X-Amz-Algorithm") != _ALGORITHM:
            raise _Refusal(
                "AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256", 400
            )
        credential = query.get("X-Amz-Credential", "")
        signed_headers = query.get("X-Amz-SignedHeaders", "")
        signature = query["X-Amz-Signature"]
        timestamp = query.get("X-Amz-Date", "")
        presigned = True
        expires = query.get("X-Amz-Expires", "")
    else:
        raise _Refusal("AccessDenied", "Access Denied")
    parts = unquote(credential).split("/")
    if (
        len(parts) != 5
        or parts[4] != "aws4_request"
        or not re.fullmatch(r"\d{8}T\d{6}Z", timestamp)
        or not expires.isdigit()
    ):
        raise _Refusal(
            "AuthorizationHeaderMalformed", "The authorization header is malformed.", 400
        )
    return _Signature(
        access_key=parts[0],
        date=parts[1],
        region=parts[2],
        service=parts[3],
        signed_headers=[name for name in signed_headers.lower().split(";") if name],
        signature=signature,
        timestamp=timestamp,
        presigned=presigned,
        expires=int(expires),
    )


def _header(environ: WSGIEnvironment, name: str) -> str | None:
    if name == "content-type":
        key = "CONTENT_TYPE"
    elif name == "content-length":
        key = "CONTENT_LENGTH"
    else:
        key = "HTTP_" + name.upper().replace("-", "_")
    value = environ.get(key)
    return None if value in (None, "") else str(value)


def _raw_target(environ: WSGIEnvironment) -> str:
    """The path and query exactly as the client sent them (werkzeug keeps them in RAW_URI)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    query = str(environ.get("QUERY_STRING", ""))
    return str(environ.get("PATH_INFO", "/")) + (f"?{query}" if query else "")


def _read_body(environ: WSGIEnvironment) -> bytes:
    """Read the request body once and hand moto a fresh stream over the same bytes."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = str(environ.get("CONTENT_LENGTH") or "")
    if length.isdigit():
        body = stream.read(int(length)) if int(length) else b""
    elif environ.get("wsgi.input_terminated"):
        body = stream.read()
    else:
        body = b""
    environ["wsgi.input"] = io.BytesIO(body)
    return bytes(body)


def _refuse(
    environ: WSGIEnvironment, refusal: _Refusal, start_response: StartResponse
) -> list[bytes]:
    request_id = uuid.uuid4().hex[:16].upper()
    if _is_json_protocol(environ):
        # DynamoDB and Step Functions: the JSON protocols answer an auth failure with 400.
        code = {
            "AccessDenied": "MissingAuthenticationTokenException",
            "InvalidAccessKeyId": "UnrecognizedClientException",
        }.get(refusal.code, "InvalidSignatureException")
        message = {
            "MissingAuthenticationTokenException": "Request is missing Authentication Token",
            "UnrecognizedClientException": "The security token included in the request is invalid.",
        }.get(code, refusal.message)
        data = json.dumps({"__type": f"com.amazon.coral.service#{code}", "message": message})
        start_response(
            "400 Bad Request",
            [
                ("Content-Type", "application/x-amz-json-1.0"),
                ("x-amzn-RequestId", request_id),
                ("x-amzn-ErrorType", code),
                ("Content-Length", str(len(data))),
            ],
        )
        return [data.encode()]
    extra = "".join(
        f"<{name.replace('_', '-')}>{_xml(value)}</{name.replace('_', '-')}>"
        for name, value in refusal.extra.items()
    )
    data = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{refusal.code}</Code><Message>{_xml(refusal.message)}</Message>{extra}"
        f"<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>"
    )
    reason = {400: "Bad Request", 403: "Forbidden"}[refusal.status]
    start_response(
        f"{refusal.status} {reason}",
        [
            ("Content-Type", "application/xml"),
            ("x-amz-request-id", request_id),
            ("Content-Length", str(len(data.encode()))),
        ],
    )
    return [data.encode()]


def _is_json_protocol(environ: WSGIEnvironment) -> bool:
    # DynamoDB and Step Functions name their operation in X-Amz-Target; S3 never does.
    return bool(environ.get("HTTP_X_AMZ_TARGET"))


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def signed_request(
    credentials: EngineCredentials, method: str, url: str, body: bytes, service: str, region: str
) -> AWSRequest:
    """A request signed with the engine's credentials (the engine's own calls to moto's API)."""
    request = AWSRequest(
        method=method, url=url, data=body, headers={"Content-Type": "application/json"}
    )
    SigV4Auth(credentials.botocore(), service, region).add_auth(request)
    return request


def sign_interpreter_clients(credentials: EngineCredentials) -> Callable[[], None]:
    """Make moto's interpreter sign with the engine's key; returns how to undo it.

    moto's ``boto_client_for`` builds every client the interpreter uses (the ItemReader's S3
    reads, the ResultWriter, service tasks) with the fixed key ``ak``/``sk``, which the
    engine's endpoints refuse. The module's ``boto3`` is swapped for one whose ``client()``
    puts the engine's key in instead.
    """
    import boto3
    from moto.stepfunctions.parser.asl.utils import boto_client

    class _Boto3WithEngineKey:
        @staticmethod
        def client(*args: Any, **kwargs: Any) -> Any:
            kwargs["aws_access_key_id"] = credentials.access_key
            kwargs["aws_secret_access_key"] = credentials.secret_key
            return boto3.client(*args, **kwargs)

    module: Any = boto_client  # its boto3 is an import, not part of its interface
    original = module.boto3
    module.boto3 = _Boto3WithEngineKey()

    def undo() -> None:
        module.boto3 = original

    return undo
