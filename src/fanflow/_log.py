"""What fanflow says on standard :mod:`logging`: the ``fanflow`` logger.

- DEBUG: each attempt as it is sent (who, attempt number, model) and how it ended.
- INFO: each retry (the error and the wait before it), each 429, each pause of sending
  after a ``Retry-After``.
- WARNING: what the user should act on (an interrupted job, a hook that raised).

Never an API key: messages carry error text the providers have already scrubbed, and no
request headers. Never a prompt, unless asked: prompts go to the ``fanflow.prompts``
logger at DEBUG, which is set to WARNING here so ``logging.basicConfig(level="DEBUG")``
does not print them; ``logging.getLogger("fanflow.prompts").setLevel("DEBUG")`` asks.

Each function checks the level first (``isEnabledFor`` is cached by logging) and takes
``who`` as a function, so a run with logging off builds no message at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._exceptions import RateLimited
from ._types import Request

__all__ = [
    "PROMPTS",
    "log",
    "log_attempt_failed",
    "log_attempt_sent",
    "log_pause",
    "log_succeeded",
]

log = logging.getLogger("fanflow")
PROMPTS = logging.getLogger("fanflow.prompts")
PROMPTS.setLevel(logging.WARNING)  # prompts only when asked (see the module docstring)


def log_attempt_sent(who: Callable[[], str], number: int, request: Request, *, hedge: bool) -> None:
    if log.isEnabledFor(logging.DEBUG):
        kind = "hedge" if hedge else f"attempt {number}"
        log.debug("%s: %s sent (model %s)", who(), kind, request.model or "default")
    if PROMPTS.isEnabledFor(logging.DEBUG):
        text = " | ".join(f"{m.role}: {m.content}" for m in request.messages)
        PROMPTS.debug("%s: prompt: %s", who(), text)


def log_attempt_failed(
    who: Callable[[], str], number: int, error: BaseException, wait: float | None
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    what = f"{type(error).__name__}: {error}"
    name = who()
    if isinstance(error, RateLimited):
        log.info("%s: attempt %d got a 429 (rate limited): %s", name, number, error)
    if wait is None:
        log.debug("%s: attempt %d failed, no retry: %s", name, number, what)
    else:
        log.info("%s: attempt %d failed (%s); retrying in %.2f s", name, number, what, wait)


def log_succeeded(who: Callable[[], str], number: int, latency: float) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: attempt %d succeeded in %.3f s", who(), number, latency)


def log_pause(seconds: float, error: BaseException) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(
            "pausing new requests for %.2f s: the server asked (Retry-After with a %s)",
            seconds,
            type(error).__name__,
        )
