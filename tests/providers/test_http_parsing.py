"""Header parsing and error classification as pure functions (no server needed)."""

from __future__ import annotations

import pickle
from email.utils import formatdate

import pytest

import fanflow
from fanflow.providers._http import Secret, classify
from fanflow.providers._ratelimit import (
    parse_anthropic,
    parse_duration,
    parse_openai,
    parse_retry_after,
    parse_rfc3339,
)

NOW = 1_700_000_000.0  # a fixed wall clock


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("120ms", 0.12),
        ("1s", 1.0),
        ("17.28s", 17.28),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("2m30.5s", 150.5),
        ("3", 3.0),
        ("soon", None),
        ("1x", None),
        ("", None),
    ],
)
def test_openai_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_precedence_and_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, NOW) == 0.25
    assert parse_retry_after({"retry-after": "2"}, NOW) == 2.0
    assert parse_retry_after({"retry-after": "1.5"}, NOW) == 1.5
    http_date = formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after({"retry-after": http_date}, NOW) == pytest.approx(30.0)
    assert parse_retry_after({"retry-after": "garbage"}, NOW) is None
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "4"}, NOW) == 4.0
    assert parse_retry_after({"retry-after": "-3"}, NOW) is None
    assert parse_retry_after({}, NOW) is None


def test_rfc3339() -> None:
    assert parse_rfc3339("2023-11-14T22:13:50Z", NOW) == pytest.approx(30.0)
    assert parse_rfc3339("2023-11-14T22:13:50.5+00:00", NOW) == pytest.approx(30.5)
    assert parse_rfc3339("2023-11-14T22:13:00Z", NOW) == 0.0  # past: no wait
    assert parse_rfc3339("yesterday", NOW) is None


def test_openai_and_anthropic_headers() -> None:
    openai = parse_openai(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "2s",
        },
        observed_at=5.0,
    )
    assert openai == fanflow.results.RateLimitState(500, 499, 0.12, 30000, 29000, 2.0, 5.0)
    anthropic = parse_anthropic(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:21Z",
        },
        observed_at=1.0,
        wall_now=NOW,
    )
    assert anthropic == fanflow.results.RateLimitState(50, 0, 1.0, None, None, None, 1.0)
    assert parse_openai({}, 0.0) is None
    assert parse_anthropic({}, 0.0, NOW) is None


def _error(
    status: int, body: bytes, headers: dict[str, str] | None = None
) -> fanflow.errors.ProviderError:
    return classify("openai", status, headers or {}, body, secret=None, rate_limit=None)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, fanflow.errors.BadRequest),
        (401, fanflow.errors.AuthenticationError),
        (403, fanflow.errors.PermissionDenied),
        (404, fanflow.errors.NotFound),
        (408, fanflow.errors.ServerError),
        (409, fanflow.errors.ServerError),
        (413, fanflow.errors.BadRequest),
        (422, fanflow.errors.BadRequest),
        (429, fanflow.errors.RateLimited),
        (500, fanflow.errors.ServerError),
        (502, fanflow.errors.ServerError),
        (503, fanflow.errors.ServerError),
        (504, fanflow.errors.ServerError),
        (529, fanflow.errors.Overloaded),
    ],
)
def test_status_classes(status: int, cls: type[fanflow.errors.ProviderError]) -> None:
    error = _error(status, b'{"error": {"message": "the server says why"}}')
    assert type(error) is cls
    assert error.status_code == status
    assert "the server says why" in str(error)
    assert fanflow.errors.is_retryable(error) is (status in (408, 409, 429) or status >= 500)


def test_429_variants() -> None:
    limited = _error(429, b"{}", {"retry-after": "7"})
    assert (type(limited), limited.retry_after) == (fanflow.errors.RateLimited, 7.0)
    from_reset = classify(
        "openai",
        429,
        {},
        b"{}",
        secret=None,
        rate_limit=fanflow.results.RateLimitState(requests_remaining=0, requests_reset=3.0),
    )
    assert from_reset.retry_after == 3.0
    quota = _error(429, b'{"error": {"message": "x", "code": "insufficient_quota"}}')
    spend = _error(429, b'{"error": {"message": "You have reached your spend limit"}}')
    for error in (quota, spend):
        assert type(error) is fanflow.errors.QuotaExceeded
        assert not fanflow.errors.is_retryable(error)
        assert "waiting will not help" in str(error)


def test_retry_after_on_5xx_is_kept() -> None:
    assert _error(503, b"{}", {"retry-after": "4"}).retry_after == 4.0
    assert _error(529, b"{}", {"retry-after-ms": "1500"}).retry_after == 1.5
    assert _error(500, b"{}").retry_after is None


def test_odd_bodies() -> None:
    assert "<html>bad gateway</html>" in str(_error(502, b"<html>bad gateway</html>"))
    assert "(empty body)" in str(_error(500, b""))
    anth = _error(400, b'{"type": "error", "error": {"type": "overloaded_error", "message": "m"}}')
    assert type(anth) is fanflow.errors.Overloaded
    filtered = _error(400, b'{"error": {"message": "no", "code": "content_policy_violation"}}')
    assert type(filtered) is fanflow.errors.ContentFiltered


def test_secret_is_scrubbed_and_never_shown() -> None:
    secret = Secret("sk-abc-123")
    error = classify(
        "openai",
        401,
        {},
        b'{"error": {"message": "Incorrect API key provided: sk-abc-123."}}',
        secret=secret,
        rate_limit=None,
    )
    assert "sk-abc-123" not in str(error)
    assert "[redacted]" in str(error)
    assert "sk-abc-123" not in repr(secret) + str(secret) + f"{secret}"
    assert pickle.loads(pickle.dumps(secret)).reveal() == "sk-abc-123"
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), str(again), again.status_code) == (type(error), str(error), 401)


def test_well_formed_json_of_the_wrong_shape_is_a_protocol_error() -> None:
    openai = fanflow.openai("m", base_url="http://127.0.0.1:9/v1", api_key="k")
    anthropic = fanflow.anthropic("m", base_url="http://127.0.0.1:9", api_key="k")
    for llm, body in ((openai, b'{"choices": []}'), (anthropic, b'{"content": 3}')):
        with pytest.raises(fanflow.errors.ProtocolError, match="not the expected JSON") as info:
            llm.parse(body, 0.1, None)
        assert info.value.retryable
    with pytest.raises(fanflow.errors.ContentFiltered):
        openai.parse(
            b'{"choices": [{"message": {"content": ""}, "finish_reason": "content_filter"}]}',
            0.1,
            None,
        )
    with pytest.raises(fanflow.errors.ContentFiltered):
        anthropic.parse(b'{"content": [], "stop_reason": "refusal"}', 0.1, None)


def test_public_names() -> None:
    import fanflow.providers

    assert {"AnthropicLLM", "OpenAILLM", "anthropic", "openai"} <= set(fanflow.providers.__all__)
    assert {"openai", "anthropic"} <= set(fanflow.__all__)
    assert "RateLimitState" in fanflow.results.__all__
    assert fanflow.openai is fanflow.providers.openai
