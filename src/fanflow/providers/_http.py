"""HTTP plumbing shared by the API adapters: pooled sessions, errors, secrets.

An adapter (``_openai.py``, ``_anthropic.py``) only translates between a
:class:`fanflow.Request` and its API's JSON; everything about the connection lives here.

- Requests go through the handle's transport (``fanflow._transport``: the seam that
  :class:`fanflow.testing.MockTransport` replaces in tests). The default,
  :class:`AiohttpTransport`, keeps one ``aiohttp.ClientSession`` per handle **per event
  loop** (``fanflow.run`` may run work on a fresh loop in another thread, and a session
  belongs to the loop that made it),
  with a keep-alive pool that does not cap concurrency (admission is the engine's job).
  A session is closed by :meth:`HttpLLM.aclose`, or when its loop shuts down, and a
  handle dropped without closing leaves nothing to the garbage collector (``_sessions``).
- Every failure becomes a classified :class:`fanflow.errors.ProviderError` (docs/architecture.md,
  "Core types"): status, the server's own message, ``retry_after`` and the rate-limit
  headers.
- API keys live in a :class:`Secret` and are scrubbed from every message we build.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from abc import abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from .._breaker import COLD_CALLS, Breaker
from .._exceptions import (
    RETRYABLE,
    AuthenticationError,
    BadRequest,
    ConfigError,
    ContentFiltered,
    NotFound,
    Overloaded,
    PermissionDenied,
    ProtocolError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    ServerError,
)
from .._limits import Limits
from .._llm import BaseLLM
from .._promptcache import PREFILLED
from .._retry import RetryPolicy
from .._transport import HttpReply, HttpRequest, Transport
from .._types import RateLimitState, Request, Response, Usage
from .._version import __version__
from ._openfiles import connection_cap, is_out_of_files, open_file_limits
from ._ratelimit import parse_retry_after, wait_from_state
from ._sessions import Sessions

__all__ = ["AiohttpTransport", "HttpLLM", "Secret", "StreamText", "classify", "normalise_url"]

#: The wall clock, for absolute times in headers (HTTP dates, RFC 3339). A seam for tests.
wall_clock: Callable[[], float] = time.time

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

_QUOTA_WORDS = ("quota", "billing", "spend limit", "usage limit", "credit balance")
_FILTER_CODES = ("content_filter", "content_policy_violation")
#: The shortest run of a key's characters that is redacted wherever it appears.
PIECE = 8
#: The most characters of a server's own error message kept in an error (after redaction).
MESSAGE_CHARS = 300


class Secret:
    """An API key that never shows itself in ``repr``, ``str`` or f-strings.

    It does pickle with its value (a handle sent to a Ray worker must still work), so a
    pickled handle is a secret too; records, errors and stores never hold a handle.
    """

    __slots__ = ("_value", "_windows")

    def __init__(self, value: str) -> None:
        self._value = value
        self._windows: frozenset[str] | None = None  # the key's pieces, made on first use

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with every piece of the key replaced by ``[redacted]``.

        A piece is any run of :data:`PIECE` (8) or more consecutive characters of the key
        (the whole key, if it is shorter): a server that echoes part of a key, or a
        message cut in the middle of one, leaks nothing either. Overlapping and adjacent
        pieces become one ``[redacted]``.
        """
        key = self._value
        if not key:
            return text
        size = min(PIECE, len(key))
        windows = self._windows
        if windows is None:
            windows = self._windows = frozenset(
                key[i : i + size] for i in range(len(key) - size + 1)
            )
        runs: list[list[int]] = []  # [start, end) of each run to redact, in order
        for i in range(len(text) - size + 1):
            if text[i : i + size] in windows:
                if runs and i <= runs[-1][1]:
                    runs[-1][1] = i + size  # overlaps or touches the last run: extend it
                else:
                    runs.append([i, i + size])
        if not runs:
            return text
        out: list[str] = []
        last = 0
        for start, end in runs:
            out += (text[last:start], "[redacted]")
            last = end
        out.append(text[last:])
        return "".join(out)

    def __repr__(self) -> str:
        return "Secret('[redacted]')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value,))


# --------------------------------------------------------------------------- errors


def _server_message(body: bytes) -> tuple[str, str | None]:
    """The server's own message and error code/type from an error body (any API), whole:
    :func:`classify` redacts the key first and only then cuts it to length."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return (text or "(empty body)"), None
    if isinstance(data, Mapping):
        error = data.get("error", data)
        if isinstance(error, Mapping):
            message = error.get("message") or error.get("detail") or json.dumps(error)
            code = error.get("code") or error.get("type")
            return str(message), str(code) if code is not None else None
        if isinstance(error, str):
            return error, None
    return json.dumps(data), None


def _cut(text: str, limit: int = MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_ADVICE = {
    RateLimited: "fanflow waits and retries; lower the concurrency or set limits= to avoid it",
    QuotaExceeded: "the account's quota or spend limit is used up: waiting will not help; "
    "check the plan and billing",
    AuthenticationError: "check the API key (api_key= or the environment variable)",
    PermissionDenied: "this key may not use this model or endpoint",
    NotFound: "check the model name and base_url",
    BadRequest: "the server rejected the request; fix the parameters named in its message",
    ContentFiltered: "the provider's content filter refused this item",
}


def classify(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    secret: Secret | None,
    rate_limit: RateLimitState | None,
) -> ProviderError:
    """The :class:`fanflow.errors.ProviderError` for an HTTP error response.

    429 -> ``RateLimited`` (``retry_after`` from ``retry-after-ms``, ``retry-after``, then
    the reset headers) unless the body says a quota or spend limit was reached
    (``QuotaExceeded``, not retryable); 408, 409, 5xx -> ``ServerError`` (529 and
    Anthropic's ``overloaded_error``: ``Overloaded``); 400/413/422 -> ``BadRequest``
    (``ContentFiltered`` for content-policy codes); 401, 403, 404 -> their own classes.
    """
    message, code = _server_message(body)
    if secret is not None:  # redact first, then cut: a cut must not split a key
        message = secret.scrub(message)
        code = secret.scrub(code) if code is not None else None
    message = _cut(message)
    code = _cut(code, 100) if code is not None else None
    lowered = f"{message} {code or ''}".lower()
    retry_after: float | None = None
    cls: type[ProviderError]
    if status == 429:
        if code == "insufficient_quota" or any(w in lowered for w in _QUOTA_WORDS):
            cls = QuotaExceeded
        else:
            cls = RateLimited
            retry_after = parse_retry_after(headers, wall_clock())
            if retry_after is None:
                retry_after = wait_from_state(rate_limit)
    elif status == 529 or code == "overloaded_error":
        cls = Overloaded
        retry_after = parse_retry_after(headers, wall_clock())
    elif status in (408, 409) or status >= 500:
        cls = ServerError
        retry_after = parse_retry_after(headers, wall_clock())  # a 503 may say when
    elif status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDenied
    elif status == 404:
        cls = NotFound
    elif code in _FILTER_CODES:
        cls = ContentFiltered
    elif status in (400, 413, 422):
        cls = BadRequest
    else:
        cls = ProviderError
    advice = _ADVICE.get(cls, RETRYABLE if cls.retryable else "not retried")
    error = cls(
        f"{provider} answered HTTP {status}: {message} ({advice})",
        status_code=status,
        retry_after=retry_after,
    )
    error.rate_limit = rate_limit
    return error


def connection_error(
    provider: str, url: str, exc: BaseException, secret: Secret | None
) -> ProviderError:
    """A transport failure as a retryable error (the aiohttp exception is not chained:
    its request info would carry the request's headers, key included)."""
    detail = f"{type(exc).__name__}: {exc}"
    if secret is not None:
        detail = secret.scrub(detail)
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return ProviderTimeout(f"{provider}: timed out connecting to {url} ({detail})")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ProtocolError(
            f"{provider}: the reply from {url} was cut off ({detail}); {RETRYABLE}"
        )
    if is_out_of_files(exc):
        # The process's own limit, not the server: the advice must say so.
        # Not "unreachable" either: the breaker must not take it for nothing listening.
        soft = open_file_limits().soft
        return ProviderConnectionError(
            f"{provider}: could not open a connection to {url}: this process has too many "
            f"files open (its open-file limit, ulimit -n, is {soft}); fanflow retries this. "
            "If it persists, lower the concurrency or raise the limit (ulimit -n)"
        )
    error = ProviderConnectionError(
        f"{provider}: could not talk to {url} ({detail}); {RETRYABLE}. "
        "If it persists, check that the server is up and base_url is right"
    )
    # No connection was made at all (refused, no such host): nothing was sent, and if
    # it repeats, nothing is listening there (the breaker reads this; a reset or a cut
    # reply is another story).
    error.unreachable = isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError)
    return error


def protocol_error(provider: str, what: str) -> ProtocolError:
    return ProtocolError(f"{provider}: the reply was not the expected JSON ({what}); {RETRYABLE}")


def endpoint(
    api: str, env: str, base_url: str | None, api_key: str | None, hosted: str, suffix: str = ""
) -> tuple[str, str | None]:
    """A handle's base URL and key: the arguments, else ``$<env>_BASE_URL`` (else
    ``hosted``) and ``$<env>_API_KEY``. ConfigError when the base URL (less a trailing
    ``suffix``) is ``hosted`` and no key is given."""
    base = base_url or os.environ.get(f"{env}_BASE_URL") or hosted
    key = api_key if api_key is not None else os.environ.get(f"{env}_API_KEY")
    if not key and base.rstrip("/").removesuffix(suffix) == hosted:
        raise ConfigError(
            f"no {api} API key: pass api_key= or set {env}_API_KEY "
            "(or point base_url= at a server that needs none)"
        )
    return base, key


def normalise_url(url: str) -> str:
    """``url`` as an endpoint's identity: scheme and host in lower case, no default port,
    no trailing slash, and nothing that may hold a secret (user info, query, fragment)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return url.strip().rstrip("/")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if port is not None and _DEFAULT_PORTS.get(scheme) != port:
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


# --------------------------------------------------------------------------- sessions


class StreamText:
    """What every streamed reply needs, whatever its API: the ``data:`` payloads of the
    server-sent events, the text pieces in order, and when the first piece arrived."""

    __slots__ = ("_loop", "_parts", "_start", "first")

    def __init__(self, start: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._start = start
        self._parts: list[str] = []
        self.first: float | None = None  # seconds from the request to the first text

    @staticmethod
    async def events(content: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """The payload of each ``data:`` line, in order (other SSE lines are skipped)."""
        async for line in content:
            if line.startswith(b"data:"):
                yield line[5:].strip()

    def add(self, piece: str | None) -> None:
        if piece:
            if self.first is None:
                self.first = self._loop.time() - self._start
                prefilled = PREFILLED.get()
                if prefilled is not None:  # a primed batch waits for this (decision 0190)
                    prefilled()
            self._parts.append(piece)

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def reply(
        self,
        usage: Usage,
        model: str | None,
        finish_reason: str | None,
        rate_limit: Callable[[float], RateLimitState | None],
    ) -> Response:
        """The whole reply, now that the stream has ended; ``rate_limit(end)`` reads the
        reply's headers as of the end."""
        end = self._loop.time()
        return Response(
            self.text,
            usage=usage,
            model=model,
            finish_reason=finish_reason,
            latency=end - self._start,
            time_to_first_token=self.first,
            rate_limit=rate_limit(end),
        )


# The most a connection reads from its socket at once. asyncio's plain TCP transport
# reads 256 KiB at a time into a new buffer, which glibc maps and unmaps per read;
# 64 KiB comes from the heap (decision 0312).
READ_SIZE = 64 * 1024


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, reporting each connection it hands out while the handle is
    cold, with the time it took (the cold start paces its first wave by them; see
    fanflow._cold). ``report`` returns False once it needs no more. Each new plain TCP
    connection reads at most :data:`READ_SIZE` at a time."""

    def __init__(self, report: Callable[[float], bool] | None, **kw: Any) -> None:
        super().__init__(**kw)
        self._report = report

    async def _create_connection(self, *args: Any) -> aiohttp.client_proto.ResponseHandler:
        protocol = await super()._create_connection(*args)  # a new connection, not pooled
        transport = protocol.transport
        # TLS and uvloop transports have no such attribute (TLS reads into one buffer).
        if transport is not None and getattr(transport, "max_size", 0) > READ_SIZE:
            transport.max_size = READ_SIZE  # type: ignore[attr-defined]
        return protocol

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.connector.Connection:
        report = self._report
        if report is None:  # every call once the handle is warm: nothing to time
            return await super().connect(req, traces, timeout)
        loop = asyncio.get_running_loop()
        start = loop.time()
        connection = await super().connect(req, traces, timeout)
        if self._report is not None and not report(loop.time() - start):
            self._report = None
            self.connect = super().connect  # type: ignore[method-assign]  # plain from now
        return connection


class _WireHeaders(dict[str, str]):
    """A request's headers, the key's among them: shown by name only."""

    def __repr__(self) -> str:
        return f"<headers {', '.join(self)}>"


class AiohttpTransport:
    """The default transport: aiohttp's keep-alive pool, one session per event loop.

    ``headers()`` are set on each session once (aiohttp then sends them with every
    request without copying them); a request carrying that same mapping adds none.
    """

    __slots__ = ("_connect_timeout", "_headers", "_on_connect", "_sessions")

    def __init__(
        self,
        headers: Callable[[], Mapping[str, str]],
        connect_timeout: float | None,
        on_connect: Callable[[], Callable[[float], bool] | None] | None = None,
    ) -> None:
        """``on_connect()``, asked when a session is made, gives the function told of
        each connection handed out while the handle is cold, with how long it took
        (None: nobody asks)."""
        self._headers = headers
        self._connect_timeout = connect_timeout
        self._on_connect = on_connect
        self._sessions = Sessions(self._new_session)

    def send(self, request: HttpRequest) -> Awaitable[HttpReply]:
        # Not a coroutine: on the hot path (a session on this loop already) the reply is
        # aiohttp's own awaitable, with no frame of ours around it.
        session = self._sessions.current()
        if session is None:
            return self._send_new(request)
        return self._request(session, request)

    async def _send_new(self, request: HttpRequest) -> HttpReply:
        return await self._request(await self._sessions.get(), request)

    def _request(
        self, session: aiohttp.ClientSession, request: HttpRequest
    ) -> Awaitable[HttpReply]:
        extra = None if request.headers is self._headers() else request.headers
        return session.request(request.method, request.url, data=request.body, headers=extra)

    async def session(self) -> aiohttp.ClientSession:
        """The session on the running loop (made on first use)."""
        return await self._sessions.get()

    async def aclose(self) -> None:
        await self._sessions.aclose()

    def _new_session(self) -> aiohttp.ClientSession:
        # Capped below the open-file limit: calls beyond it wait for a free connection
        # instead of failing with "Too many open files" (see _openfiles).
        report = self._on_connect() if self._on_connect is not None else None
        connector = _Connector(report, limit=connection_cap(), keepalive_timeout=30.0)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
        )


class HttpLLM(BaseLLM):
    """Base of the HTTP handles: a pooled session per loop, a key, a base URL."""

    provider: ClassVar[str] = "http"
    #: The header in which the API names its id of a request (None: it names none).
    request_id_header: ClassVar[str | None] = None
    hedges: ClassVar[bool] = True  # a duplicate is one more request: the hedging policy
    # The provider's own API (its default base URL), where a round trip is the model's
    # time: it refuses a key's calls beyond its limits (429), it does not queue them.
    hosted: ClassVar[str | None] = None

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float | None = 10.0,
        limits: Limits | Mapping[str, Limits] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        defaults: Mapping[str, Any] | None = None,
        transport: Transport | None = None,
    ) -> None:
        super().__init__(
            model=model, limits=limits, retry=retry, timeout=timeout, defaults=defaults
        )
        self.base_url = base_url.rstrip("/")
        hosted = self.hosted
        self._at_hosted = hosted is not None and normalise_url(base_url) == normalise_url(hosted)
        #: The endpoint's name in the cache identity (None: the normalised base URL).
        #: Set it when several URLs serve the same model, to share one cache.
        self.cache_endpoint: str | None = None
        self.stream = stream
        self._secret = Secret(api_key) if api_key else None
        # An explicit User-Agent (yours in ``headers`` wins): servers see fanflow's name
        # and version, and aiohttp need not copy the headers of every request to skip its
        # own default (it does that for ``skip_auto_headers``).
        given = dict(headers or {})
        defaults = {"Content-Type": "application/json", "User-Agent": f"fanflow/{__version__}"}
        mine = {name.lower() for name in given}
        self._headers = {
            **{k: v for k, v in defaults.items() if k.lower() not in mine},
            **given,
        }
        self._connect_timeout = connect_timeout
        self._wire_headers: Mapping[str, str] | None = None
        #: Sends this handle's requests (default: aiohttp's pool).
        self.transport: Transport = transport or self._default_transport()
        # Wrong keys, URLs and model names are an HTTP matter: a new handle starts cold
        # (its first calls answer before a whole batch is sent; see fanflow._breaker).
        self.breaker = Breaker(cold_start=COLD_CALLS)

    def __repr__(self) -> str:
        return f"fanflow.{self.provider}(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def round_trip_is_work(self) -> bool:
        """Only against the provider's own API. Elsewhere (a server of your own: vLLM,
        llama.cpp, Ollama) a call may wait in the server's queue behind our other calls,
        and only a time the server reports in the reply is the model's (decision 0170)."""
        return self._at_hosted

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_wire_headers"] = None
        if isinstance(self.transport, AiohttpTransport):  # its pool stays in this process
            state["transport"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if state["transport"] is None:
            self.transport = self._default_transport()

    def _default_transport(self) -> AiohttpTransport:
        return AiohttpTransport(self.wire_headers, self._connect_timeout, self._first_connection)

    def _first_connection(self) -> Callable[[float], bool] | None:
        breaker = self.breaker
        return breaker.connected if breaker is not None and breaker.active else None

    def wire_headers(self) -> Mapping[str, str]:
        """Every header of this handle's requests, the key's included (made once)."""
        if self._wire_headers is None:
            self._wire_headers = _WireHeaders({**self._headers, **self.auth_headers()})
        return self._wire_headers

    def cache_identity(self) -> dict[str, Any]:
        """The protocol, the endpoint (normalised base URL) and the model; never the key
        or headers (see :meth:`fanflow.BaseLLM.cache_identity`)."""
        return {
            "protocol": self.provider,
            "endpoint": self.cache_endpoint or normalise_url(self.base_url),
            "model": self.model,
        }

    # -- what each API defines ----------------------------------------------------------

    url: str

    def auth_headers(self) -> dict[str, str]:
        """The headers that carry the key (each API names its own)."""
        return {}

    @abstractmethod
    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body for ``request`` (the handle's defaults already filled in)."""

    def batch_body(self, request: Request) -> dict[str, Any]:
        """The body of ``request`` as a line of a provider batch."""
        return self.body(request)

    @abstractmethod
    def parse(self, raw: bytes, latency: float, rate_limit: RateLimitState | None) -> Response:
        """The Response for a 200 body; raise ProtocolError if it is not the API's JSON."""

    @abstractmethod
    async def read_stream(
        self, content: AsyncIterable[bytes], start: float, headers: Mapping[str, str]
    ) -> Response:
        """Collect a server-sent-event stream into a Response (with time to first token)."""

    @abstractmethod
    def rate_limits(self, headers: Mapping[str, str], observed_at: float) -> RateLimitState | None:
        """The rate-limit headers of a response, if it has any."""

    # -- one attempt -----------------------------------------------------------------------

    async def complete(self, request: Request) -> Response:
        """POST one request; return its Response or raise a classified ProviderError."""
        start = asyncio.get_running_loop().time()
        payload = _dumps(self.body(request)).encode()
        wire = HttpRequest("POST", self.url, self.wire_headers(), payload)
        try:
            async with await self.transport.send(wire) as reply:
                status, headers = reply.status, reply.headers
                if status == 200 and self.stream:
                    streamed = await self.read_stream(reply.content, start, headers)
                    return self._named(streamed, headers)
                raw = await reply.read()
        except TRANSPORT_ERRORS as exc:
            raise self.broken(self.url, exc) from None
        end = asyncio.get_running_loop().time()
        limits = self.rate_limits(headers, end)
        if status != 200:
            error = self.fail(status, headers, raw, limits)
            named = self._request_id(headers)
            raise error.with_extra({REQUEST_ID: named}) if named else error
        return self._named(self.parse(raw, end - start, limits), headers)

    def _request_id(self, headers: Mapping[str, str]) -> str | None:
        name = self.request_id_header
        return headers.get(name) if name is not None else None

    def _named(self, response: Response, headers: Mapping[str, str]) -> Response:
        """``response`` (just parsed: nothing else holds it) with the API's id of its
        request added to ``extra``, when it gave one."""
        named = self._request_id(headers)
        if named:  # in place, not a copy: the hot path
            object.__setattr__(response, "extra", {**response.extra, REQUEST_ID: named})
        return response

    async def aclose(self) -> None:
        """Close the connection pool. The handle stays usable: a new pool opens on demand."""
        await self.transport.aclose()

    def scrub(self, text: str) -> str:
        return self._secret.scrub(text) if self._secret is not None else text

    def fail(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        rate_limit: RateLimitState | None,
    ) -> ProviderError:
        return classify(
            self.provider, status, headers, body, secret=self._secret, rate_limit=rate_limit
        )

    def broken(self, url: str, exc: BaseException) -> ProviderError:
        return connection_error(self.provider, url, exc, self._secret)


#: The key in ``Response.extra`` (and ``ProviderError.extra``) of the API's id of the
#: request, from its ``request_id_header`` (OpenAI's ``x-request-id``).
REQUEST_ID = "request_id"

#: Exceptions of aiohttp that mean the transport failed (not the HTTP exchange).
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
