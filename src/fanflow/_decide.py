"""What follows a failed attempt: one decision, a function of what was seen.

:func:`decide` takes the attempt's error, what the handle had seen when it failed
(:class:`Seen`) and the retry policy, and returns a :class:`Verdict`: wait this long and
try again (and whether that used up an attempt), or stop. The engine applies it (the
breaker hears of a refusal, the attempt is annotated, the call sleeps) and so do the
batch queue's control calls. Nothing else decides a retry.

The rules, in the order they apply (decisions 0132, 0151, 0157, 0165, 0240):

1. An error that is not retryable stops the call.
2. A 429/529 caused by the handle's own load is requeued: it does not use up an
   attempt (at most :data:`MAX_REQUEUES` per call). Own load means another call
   succeeded while this one was out, or a call in flight when the server first refused
   is still in flight (a refusal comes back in one round trip: the server took that
   call, so it is full). Any other failure uses up an attempt; a 429 to a call alone in
   flight before any call of the handle succeeded is reported to the breaker
   (``refused``: three trip it). With the attempts used up, the call stops.
3. A Retry-After is waited exactly, whatever the status (429, 529 or 5xx), and at most
   the policy's ``max_wait``: the server said when, no sooner and no later.
4. A plain 5xx with no Retry-After in a batch's tail (the batch has handed out its last
   item, or slots stand free) while the handle's other calls succeed goes again at once.
5. Otherwise, the policy's backoff (full jitter).
6. A wait that would end at or past the deadline stops the call instead.

The lane's own reaction to a 429/529 (a fixed lane pauses for the Retry-After, an
adaptive one lowers its limit) is the lane's: it learns it from the attempt's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._exceptions import Overloaded, ProviderError, RateLimited, ServerError, is_retryable
from ._retry import RetryPolicy

__all__ = ["MAX_REQUEUES", "STOP", "TAIL_RETRY_NOTE", "Seen", "Verdict", "decide"]

# The most 429/529s one call may have requeued without using up an attempt (the
# deadline bounds them too).
MAX_REQUEUES = 100

# The note on an attempt whose 5xx was retried at once in a batch's tail.
TAIL_RETRY_NOTE = (
    "retried at once (no backoff): a 5xx in the batch's tail (every item started, or "
    "free slots), the handle's other calls succeeding"
)


@dataclass(frozen=True, slots=True)
class Seen:
    """What the handle had seen when an attempt failed.

    Args:
        tries: attempts that used up the retry budget, the failed one included.
        requeues: this call's 429/529s requeued so far.
        succeeded_since_sent: another call of the handle succeeded while it was out.
        accepted_in_flight: a call in flight when the server first refused (with no
            success since) is still in flight.
        alone_unanswered: no other call is in flight and none has ever succeeded.
        succeeded_since_call: calls of the handle succeeded since this call began.
        draining: the batch has handed out its last item.
        idle: slots stand free that nobody waits for (the handle's and the pattern's).
        time_left: seconds to the call's deadline (None: no deadline).
    """

    tries: int
    requeues: int = 0
    succeeded_since_sent: bool = False
    accepted_in_flight: bool = False
    alone_unanswered: bool = False
    succeeded_since_call: bool = False
    draining: bool = False
    idle: bool = False
    time_left: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a failed attempt.

    Args:
        wait: seconds to wait before the next attempt (None: stop).
        requeued: the failed attempt did not use up an attempt.
        refused: report the 429 to the handle's breaker.
        note: why the wait is not simply what the server asked (for the attempt).
    """

    wait: float | None
    requeued: bool = False
    refused: bool = False
    note: str | None = None


STOP = Verdict(None)


def decide(
    error: BaseException, seen: Seen, policy: RetryPolicy, *, attempts: int | None = None
) -> Verdict:
    """The verdict on an attempt that failed with ``error`` (see the module docstring).

    ``attempts``: the attempts allowed, when not the policy's. The backoff's jitter is
    drawn from the policy's generator; with ``jitter=False`` the result depends on the
    arguments alone.
    """
    if not is_retryable(error):
        return STOP
    overload = isinstance(error, RateLimited | Overloaded)
    requeued = (
        overload
        and seen.requeues < MAX_REQUEUES
        and (seen.succeeded_since_sent or seen.accepted_in_flight)
    )
    refused = False
    tries = seen.tries
    if requeued:
        tries -= 1
    else:
        refused = isinstance(error, RateLimited) and seen.alone_unanswered
        if tries >= (policy.attempts if attempts is None else attempts):
            return Verdict(None, refused=refused)
    asked = error.retry_after if isinstance(error, ProviderError) else None
    note = None
    if asked is not None and asked > 0:
        wait = asked
        if asked > policy.max_wait:
            wait = policy.max_wait
            note = (
                f"the server asked to wait {asked:g} s (Retry-After); waited "
                f"{policy.max_wait:g} s, the retry policy's max_wait"
            )
    elif _in_tail(error, asked, seen):
        wait = 0.0
        note = TAIL_RETRY_NOTE
    else:
        wait = policy.backoff(max(1, tries))
        if overload:
            note = (
                f"no usable Retry-After (missing, zero, negative, a past date or "
                f"unreadable): waited {wait:.3g} s (backoff)"
            )
    if seen.time_left is not None and wait >= seen.time_left:
        note = f"the deadline would pass during the {wait:.3g} s wait: stopped"
        return Verdict(None, requeued=requeued, refused=refused, note=note)
    return Verdict(wait, requeued=requeued, refused=refused, note=note)


def _in_tail(error: BaseException, asked: float | None, seen: Seen) -> bool:
    """A plain 5xx (not an overload) with no Retry-After, in a batch's tail, while the
    server is up: the error is the item's bad luck, and a backoff would only add to
    the makespan (decisions 0151, 0157). Mid-batch, where slots are contended, and
    against a failing server, the backoff stands."""
    return (
        type(error) is ServerError
        and asked is None
        and seen.succeeded_since_call
        and (seen.draining or seen.idle)
    )
