from __future__ import annotations

import pickle

import pytest

import fanflow
from fanflow import errors as ex

ALL_ERRORS = [
    getattr(ex, name)
    for name in ex.__all__
    if isinstance(getattr(ex, name), type) and issubclass(getattr(ex, name), BaseException)
]


def _instance(cls: type[BaseException]) -> BaseException:
    if issubclass(cls, ex.ProviderError):
        return cls("boom", status_code=429, retry_after=1.5)
    if cls is ex.AllFailed:
        return ex.AllFailed("all failed", [ex.ServerError("a"), ex.BadRequest("b")])
    if cls is ex.DeploymentsFailed:
        return ex.DeploymentsFailed("every deployment failed", [("'a'", ex.ServerError("a"))])
    if cls is ex.QuorumNotMet:
        return ex.QuorumNotMet("quorum", succeeded=1, required=2, metadata={"w": [1]})
    if cls is ex.BatchError:
        return ex.BatchError({3: ex.ServerError("x")}, 5)
    if cls is ex.CallTimeout:
        return ex.CallTimeout("late", timeout=2.0)
    if cls is ex.StepInputError:
        return ex.StepInputError("missing", step="summarize", field="text", index=2)
    if cls is ex.CircuitOpen:
        return ex.CircuitOpen("not sent: check the key", kind="key")
    if cls is ex.TemplateError:
        return ex.TemplateError("no field", field="text", index=3)
    return cls("message")


def test_every_error_is_a_fanflow_error() -> None:
    assert len(ALL_ERRORS) >= 20
    for cls in ALL_ERRORS:
        assert issubclass(cls, fanflow.FanflowError), cls


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_errors_round_trip_through_pickle(cls: type[BaseException]) -> None:
    error = _instance(cls)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__ or cls in (
        ex.AllFailed,
        ex.DeploymentsFailed,
        ex.BatchError,
    )
    if isinstance(error, ex.ProviderError):
        assert isinstance(copy, ex.ProviderError)
        assert (copy.status_code, copy.retry_after) == (429, 1.5)


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ex.RateLimited("x", retry_after=2), True),
        (ex.ProviderTimeout("x"), True),
        (ex.ServerError("x"), True),
        (ex.Overloaded("x"), True),
        (ex.ProviderConnectionError("x"), True),
        (ex.ProtocolError("x"), True),
        (ex.CallTimeout("x"), True),
        (ConnectionResetError(), True),
        (ex.BadRequest("x"), False),
        (ex.AuthenticationError("x"), False),
        (ex.PermissionDenied("x"), False),
        (ex.NotFound("x"), False),
        (ex.ContentFiltered("x"), False),
        (ex.QuotaExceeded("x"), False),
        (ValueError("user bug"), False),
    ],
)
def test_is_retryable_reads_the_class_not_the_message(
    error: BaseException, retryable: bool
) -> None:
    assert fanflow.errors.is_retryable(error) is retryable


def test_all_failed_lists_every_failure() -> None:
    e = ex.AllFailed("all 2 failed", [ex.ServerError("first"), ex.BadRequest("second")])
    assert "[0] ServerError: first" in str(e)
    assert "[1] BadRequest: second" in str(e)
    assert len(e.failures) == 2


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0; use None"):
        fanflow.Limits(concurrency=0)
