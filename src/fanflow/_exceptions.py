"""The fanflow error tree.

Every error fanflow raises or records is a :class:`FanflowError`::

    FanflowError
    ├── ProviderError                  a model call failed (``status_code``, ``retryable``)
    │   ├── RateLimited                429; ``retry_after`` seconds when the server said
    │   ├── ProviderTimeout            the provider (or an attempt) took too long
    │   ├── ServerError                5xx, 408, 409
    │   │   └── Overloaded             529 / "overloaded"
    │   ├── ProviderConnectionError    refused, reset, DNS
    │   ├── ProtocolError              the reply was not the expected format
    │   ├── BadRequest                 400, 413, 422 (not retryable)
    │   ├── AuthenticationError        401 (not retryable)
    │   ├── PermissionDenied           403 (not retryable)
    │   ├── NotFound                   404 (not retryable)
    │   ├── ContentFiltered            refused by a content filter (not retryable)
    │   ├── QuotaExceeded              429 whose body says the spend/quota is used up
    │   └── BatchIncomplete            a provider batch ended before answering (``batch_id``)
    ├── CallTimeout                    a call ran past its timeout or the deadline
    ├── ParseError                     the model answered but the reply was unusable
    ├── TemplateError                  an item lacks a field the prompt template needs
    │   └── StepInputError             a chain/flow step's input key is missing (``step``)
    ├── ConfigError                    an option is invalid (raised at construction)
    ├── StoreError                     the result store cannot be read or written
    ├── BatchError                     opt-in: raised by ``MapResult.raise_for_errors``
    ├── AllFailed                      every alternative failed (``race``; ``failures``)
    ├── QuorumNotMet                   fewer successes than a pattern's quorum
    ├── BudgetExceeded                 the budget cannot cover the next call
    ├── RequestTooLarge                one request needs more than a rate limit allows
    └── Skipped                        an item was not run (budget, deadline, upstream)
        └── CircuitOpen                not sent: the handle's breaker tripped (bad key,
                                       unknown model, quota, nothing listening)

Whether to retry is decided by one function, :func:`is_retryable`, which reads the
``retryable`` attribute, never the message text. All errors pickle (they cross process
boundaries with the Ray backend); each keeps its constructor arguments in ``args``.

Messages say what happened, to which item, and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from ._batchinfo import batch_extra

if TYPE_CHECKING:
    from ._types import RateLimitState

#: What a retryable error's message says about retrying. Neutral on purpose: whether it
#: is sent again depends on the call's retry policy (none, or attempts used up).
RETRYABLE = "retryable: sent again if the retry policy allows"


class FanflowError(Exception):
    """Base of every fanflow error."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild without calling __init__ (subclasses take keyword-only arguments),
        # restoring args and attributes: every error round-trips through pickle.
        return (_rebuild_error, (type(self), self.args, self.__dict__))


_E = TypeVar("_E", bound="FanflowError")


def _rebuild_error(cls: type[_E], args: tuple[Any, ...], state: dict[str, Any]) -> _E:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


# --------------------------------------------------------------------------- providers


class ProviderError(FanflowError):
    """A model call failed.

    Args:
        message: what happened and what to do (never contains secrets).
        status_code: the HTTP status, when there was one.
        retry_after: seconds the server asked us to wait, when it said.
        extra: what a backend adds, by key (the batch backend's
            :class:`fanflow.backends.BatchInfo`: the batch that answered with this error).

    Attributes:
        rate_limit: the rate-limit headers of the failed HTTP response, when it had any
            (a limiter reads them; see :class:`fanflow.results.RateLimitState`).
    """

    retryable: bool = False
    rate_limit: RateLimitState | None = None
    extra: Mapping[str, Any] = MappingProxyType({})

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        if extra is not None:
            self.extra = dict(extra)

    def with_extra(self, extra: Mapping[str, Any]) -> Self:
        """A copy of this error with ``extra`` added to its own (this one is unchanged)."""
        state = {**self.__dict__, "extra": {**self.extra, **extra}}
        return _rebuild_error(type(self), self.args, state)


class BatchIncomplete(ProviderError):
    """A provider batch ended (expired, cancelled, failed) before it answered this
    request, or its results had no line for it. Retryable: the request goes into a new
    batch (or real time, with ``mode="auto"``). ``batch_id`` names the batch."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        batch_id: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        extra = batch_extra(batch_id) if batch_id is not None else None
        super().__init__(message, status_code=status_code, retry_after=retry_after, extra=extra)
        self.batch_id = batch_id


class RateLimited(ProviderError):
    """The provider answered 429 Too Many Requests. ``retry_after`` is in seconds."""

    retryable = True


class ProviderTimeout(ProviderError):
    """The provider did not answer in time."""

    retryable = True


class ServerError(ProviderError):
    """The provider failed on its side (5xx, 408, 409)."""

    retryable = True


class Overloaded(ServerError):
    """The provider is overloaded (529)."""

    retryable = True


class ProviderConnectionError(ProviderError):
    """The connection was refused, reset or could not be made.

    ``unreachable`` is True when no connection could be made at all (refused, no such
    host), as opposed to one that broke: repeated, it trips the handle's breaker.
    """

    retryable = True
    unreachable: bool = False


class ProtocolError(ProviderError):
    """The provider's reply was not in the expected format."""

    retryable = True


class BadRequest(ProviderError):
    """The provider rejected the request as malformed (400, 413, 422)."""


class AuthenticationError(ProviderError):
    """The API key was missing or wrong (401)."""


class PermissionDenied(ProviderError):
    """The key may not use this model or endpoint (403)."""


class NotFound(ProviderError):
    """The model or endpoint does not exist (404)."""


class ContentFiltered(ProviderError):
    """The provider's content filter refused the request or the reply."""


class QuotaExceeded(ProviderError):
    """The account's spend or quota limit is reached; waiting will not help."""


def is_retryable(error: BaseException) -> bool:
    """Whether a failed attempt may be retried. The one place that decides it."""
    if isinstance(error, ProviderError):
        return error.retryable
    if isinstance(error, CallTimeout):
        return True
    # A connection-level OSError from a user's own callable: retry, like a reset.
    return isinstance(error, ConnectionError)


# --------------------------------------------------------------------------- engine


class CallTimeout(FanflowError):
    """A call ran past its per-attempt timeout or the overall deadline."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message, timeout)
        self.timeout = timeout


class ParseError(FanflowError):
    """The model answered, but the pattern could not use the reply (parse, schema)."""


class TemplateError(FanflowError):
    """An item lacks a field that the prompt template needs."""

    def __init__(self, message: str, *, field: str | None = None, index: int | None = None):
        super().__init__(message, field, index)
        self.field = field
        self.index = index


class StepInputError(TemplateError):
    """A chain or flow step needs an input key that is not there; names step and key."""

    def __init__(
        self, message: str, *, step: str, field: str | None = None, index: int | None = None
    ):
        FanflowError.__init__(self, message, step, field, index)
        self.step = step
        self.field = field
        self.index = index


class ConfigError(FanflowError, ValueError):
    """An option is invalid. Raised at construction, with the fix in the message."""


class StoreError(FanflowError):
    """The result store cannot be opened, read or written (corrupt, locked, unwritable).

    ``path`` names the file. fanflow never runs on without persistence when a store was
    asked for: the pattern stops with this error instead.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message, path)
        self.path = path


class Skipped(FanflowError):
    """An item was not run (budget spent, deadline passed, or an upstream step failed)."""


class CircuitOpen(Skipped):
    """Not sent: the handle's breaker tripped, because every further call would fail the
    same way (``kind``: ``"key"``, ``"quota"``, ``"forbidden"``, ``"missing"``,
    ``"unreachable"`` or ``"refused"``; ``"failing"`` when a router took it out of
    rotation after 5xx errors). The message says what to fix; ``__cause__`` is the last
    error."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message, kind)
        self.message = message
        self.kind = kind


# --------------------------------------------------------------------------- patterns


class BatchError(FanflowError):
    """Some items of a batch failed (raised only by ``MapResult.raise_for_errors``)."""

    def __init__(self, errors: Mapping[int, BaseException], total: int) -> None:
        first = min(errors)
        msg = (
            f"{len(errors)} of {total} items failed; first: item {first}: "
            f"{type(errors[first]).__name__}: {errors[first]}"
        )
        super().__init__(msg, dict(errors), total)
        self.errors = dict(errors)
        self.total = total

    def __str__(self) -> str:
        return str(self.args[0])


class AllFailed(FanflowError):
    """Every alternative failed. ``failures`` holds each one's error, in order."""

    def __init__(self, message: str, failures: Sequence[BaseException]) -> None:
        lines = [message]
        lines += [f"  [{i}] {type(e).__name__}: {e}" for i, e in enumerate(failures)]
        super().__init__("\n".join(lines), list(failures))
        self.failures = list(failures)


class DeploymentsFailed(AllFailed):
    """Every deployment of a router (``fanflow.router``) failed this item.
    ``failures`` holds each one's error and ``names`` the deployments, in the order
    they were tried."""

    def __init__(self, message: str, failures: Sequence[tuple[str, BaseException]]) -> None:
        lines = [message]
        lines += [f"  {name}: {type(e).__name__}: {e}" for name, e in failures]
        FanflowError.__init__(self, "\n".join(lines), list(failures))
        self.failures = [e for _, e in failures]
        self.names = [name for name, _ in failures]


class QuorumNotMet(FanflowError):
    """Fewer calls succeeded than the pattern's quorum requires."""

    def __init__(self, message: str, *, succeeded: int, required: int, metadata: Any = None):
        super().__init__(message, succeeded, required, metadata)
        self.succeeded = succeeded
        self.required = required
        self.metadata = metadata


class BudgetExceeded(FanflowError):
    """The budget cannot cover the next call."""


class RequestTooLarge(FanflowError):
    """One request needs more tokens than a rate limit allows per period: it could
    never be sent, so it fails at once instead of waiting forever."""
