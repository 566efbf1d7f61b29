"""The ``fanflow`` logger: attempts at DEBUG; retries, 429s and pauses at INFO; never a
key; a prompt only when the ``fanflow.prompts`` logger is asked for it.

SimServer runs in the test's loop over real loopback HTTP, on looptime's virtual clock.
"""

from __future__ import annotations

import logging

import pytest

import fanflow
from fanflow import RetryPolicy
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

KEY = "sk-log-test-5f3a9c1e7b2d4a68"
PROMPT = "a very private prompt about item 7"


async def test_attempts_retries_429s_and_pauses_are_logged_without_key_or_prompt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fanflow")
    async with SimServer(api_key=KEY, fault_on={"private": ["429"]}) as server:
        llm = fanflow.openai("m", base_url=server.url, api_key=KEY, retry=RetryPolicy(attempts=3))
        async with llm:
            result = await fanflow.map(llm, "{q}", [{"q": PROMPT}])
    assert result.outputs == [f"echo: {PROMPT}"]
    messages = [(r.levelno, r.name, r.getMessage()) for r in caplog.records]
    text = "\n".join(m for _, _, m in messages)
    assert (logging.DEBUG, "fanflow", "item 0: attempt 1 sent (model m)") in messages
    assert any(
        level == logging.INFO and "item 0: attempt 1 got a 429 (rate limited)" in m
        for level, _, m in messages
    )
    assert any(
        level == logging.INFO
        and m.startswith("item 0: attempt 1 failed (RateLimited:")
        and "retrying in" in m
        for level, _, m in messages
    )
    assert any(
        level == logging.INFO and m.startswith("pausing new requests for")
        for level, _, m in messages
    )
    assert any(m.startswith("item 0: attempt 2 succeeded in") for m in text.splitlines())
    assert KEY not in text
    assert KEY[-6:] not in text
    assert "private prompt" not in text


async def test_prompts_are_logged_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fanflow")
    llm = fanflow.function(lambda prompt: prompt.upper())
    await fanflow.map(llm, "{q}", [{"q": PROMPT}])
    assert not any(PROMPT in r.getMessage() for r in caplog.records)
    caplog.set_level(logging.DEBUG, logger="fanflow.prompts")
    await fanflow.map(llm, "{q}", [{"q": PROMPT}])
    prompts = [r for r in caplog.records if r.name == "fanflow.prompts"]
    assert [r.getMessage() for r in prompts] == [f"item 0: prompt: user: {PROMPT}"]
