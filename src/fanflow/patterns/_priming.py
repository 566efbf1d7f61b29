"""Priming a batch whose requests share a cacheable prefix (docs/decisions/0190).

A provider caches a prompt's prefix only once a request carrying it has been
processed, so requests sent at the same moment all miss: run 100 at once and the first
100 pay the prefix in full (on Anthropic each one a cache *write*, at 1.25x). Priming
sends one request first and releases the rest when it is done; every later call then
reads the cache.

:func:`shared_prefix` is the rule: a batch is primed when its first items' requests
(the requests as the provider lays them out: system prompt, then the messages) share a
prefix at least the model's cache minimum long, the handle's provider caches prompts
(OpenAI's API and the servers that speak it; Anthropic's, with its ``cache_control``
placed by fanflow), and there are more than :data:`PRIME_MIN_ITEMS` items. A system
prompt that differs between items while each is long enough to cache (a timestamp in
it), or a template whose constant text after a field would, put first, make the shared
prefix long enough, means nothing can be cached: said once, on the ``fanflow`` logger,
and not primed. fanflow never reorders a prompt to fix it (decision 0276).
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from typing import Any

from .._llm import LLM
from .._log import log
from .._promptcache import minimum_tokens
from .._tokens import estimate_tokens
from .._types import Request
from ._prompt import constant_lead

__all__ = [
    "PRIME_MIN_ITEMS",
    "STEP_PRIMERS",
    "Prefix",
    "PrimedRunner",
    "StepPrimers",
    "cache_provider",
    "prefix_of",
    "primed_step",
    "should_prime",
]

#: A batch of at most this many items is not primed: the round trip it adds is a large
#: share of a short batch's makespan. It is also how many items the decision reads.
PRIME_MIN_ITEMS = 8


class Prefix:
    """The prefix a batch's first requests share: its text and estimated tokens, and
    the shortest the model caches."""

    __slots__ = ("minimum", "text", "tokens")

    def __init__(self, text: str, minimum: int) -> None:
        self.text = text
        self.tokens = estimate_tokens(text)
        self.minimum = minimum

    @property
    def cacheable(self) -> bool:
        return self.tokens >= self.minimum


def cache_provider(llm: LLM) -> str | None:
    """``"openai"`` or ``"anthropic"`` when ``llm``'s provider caches prompt prefixes
    (Anthropic's only when fanflow places the ``cache_control`` breakpoints), else None."""
    provider = getattr(llm, "provider", None)
    if provider == "openai":
        return "openai"
    if provider == "anthropic" and getattr(llm, "cache_control", False):
        return "anthropic"
    return None


def _laid_out(request: Request) -> str:
    """The request's text in the order the provider reads it: system prompt first."""
    system = [m.content for m in request.messages if m.role == "system"]
    rest = [m.content for m in request.messages if m.role != "system"]
    return "\n\n".join(system) + "\x00" + "\x00".join(rest)


def prefix_of(llm: LLM, requests: Sequence[Request]) -> Prefix | None:
    """The prefix ``requests`` share (None: the provider caches nothing, or fewer than
    two requests)."""
    provider = cache_provider(llm)
    if provider is None or len(requests) < 2:
        return None
    model = requests[0].model or getattr(llm, "model", None)
    common = _common_prefix([_laid_out(r) for r in requests])
    return Prefix(common.replace("\x00", "\n\n"), minimum_tokens(provider, model))


def _common_prefix(texts: Sequence[str]) -> str:
    """The longest text every one of ``texts`` starts with."""
    first, last = min(texts), max(texts)  # the others sort between these two
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def _late_constant(prompt: object, prefix: Prefix) -> tuple[int, str] | None:
    """A template's constant text after its first field, when moving it before the
    field would give the calls a prefix long enough to cache: its estimated tokens and
    the field (None otherwise)."""
    if not isinstance(prompt, str):
        return None
    parts = list(string.Formatter().parse(prompt))
    first = next((name for _, name, _, _ in parts if name is not None), None)
    if first is None:
        return None
    after = "".join(literal for literal, _, _, _ in parts[1:])
    tokens = estimate_tokens(after)
    return (tokens, first) if tokens and prefix.tokens + tokens >= prefix.minimum else None


def _system_varies(requests: Sequence[Request], minimum: int) -> int | None:
    """The first item whose system prompt differs from item 0's while both are long
    enough to cache (None: no such item)."""
    first = requests[0].system
    if first is None or estimate_tokens(first) < minimum:
        return None
    for i, request in enumerate(requests[1:], start=1):
        if request.system != first and estimate_tokens(request.system or "") >= minimum:
            return i
    return None


def should_prime(
    llm: LLM, build: Callable[[Any, int], Request], items: Sequence[Any], pattern: str
) -> bool:
    """Whether a batch whose first items are ``items`` should be primed (see the module
    docstring); says once why nothing can be cached when the system prompt varies."""
    if len(items) <= PRIME_MIN_ITEMS:
        return False
    try:
        requests = [build(item, i) for i, item in enumerate(items)]
    except Exception:  # a bad item fails on its own when the batch runs
        return False
    prefix = prefix_of(llm, requests)
    if prefix is None:
        return False
    if prefix.cacheable:
        return True
    late = _late_constant(getattr(build, "prompt", None), prefix)
    if late is not None:
        # Advice, never a rewrite: moving the user's text would change the prompt
        # (decision 0276).
        log.warning(
            "fanflow.%s: the calls share ~%d tokens of prompt, under the %d the provider "
            "caches from, because ~%d tokens of the template's constant text come after "
            "its first field {%s}; put that text before the first field (or in system=) "
            "to have it cached. fanflow does not reorder a prompt (that would change what "
            "the model is asked); the calls are not primed",
            pattern,
            prefix.tokens,
            prefix.minimum,
            *late,
        )
    varies = _system_varies(requests, prefix.minimum)
    if varies is not None:
        log.warning(
            "fanflow.%s: the system prompt of item %d differs from item 0's, so the "
            "provider can cache no prefix and every call pays its whole prompt; the "
            "calls are not primed. Keep per-item values (a timestamp, an id) out of the "
            "system prompt, or put them after its constant text",
            pattern,
            varies,
        )
    return False


class StepPrimers:
    """A Pool run's priming of its model steps: per skill, the first call goes alone and
    the skill's other calls wait until it has ended (``force``: every model step, else
    those whose system prompt and constant leading text the model caches)."""

    __slots__ = ("force", "gates")

    def __init__(self, force: bool) -> None:
        self.force = force
        self.gates: dict[int, asyncio.Event] = {}


#: Set while a Pool's runner runs an input (``Pool(prime=)``, decision 0190).
STEP_PRIMERS: ContextVar[StepPrimers | None] = ContextVar("fanflow_step_primers", default=None)


class PrimedRunner:
    """A Pool's runner whose model steps are primed, in whichever process runs it: one
    :class:`StepPrimers` per process and run (a Ray worker unpickles its own copy, so
    each worker sends a step's first call alone: one miss per worker at most)."""

    __slots__ = ("_primers", "force", "runner")

    def __init__(self, runner: Any, force: bool) -> None:
        self.runner = runner
        self.force = force
        self._primers: StepPrimers | None = None

    def __reduce__(self) -> tuple[type[PrimedRunner], tuple[Any, bool]]:
        return (PrimedRunner, (self.runner, self.force))  # the gates stay in this process

    async def execute(self, inputs: Any, **kw: Any) -> Any:
        if self._primers is None:
            self._primers = StepPrimers(self.force)
        token = STEP_PRIMERS.set(self._primers)
        try:
            return await self.runner.execute(inputs, **kw)
        finally:
            STEP_PRIMERS.reset(token)


def _step_caches(llm: LLM, system: str | None, prompt: str) -> bool:
    provider = cache_provider(llm)
    if provider is None:
        return False
    constant = (system or "") + constant_lead(prompt)
    return estimate_tokens(constant) >= minimum_tokens(provider, getattr(llm, "model", None))


@contextlib.asynccontextmanager
async def primed_step(
    step: object, llm: LLM, system: str | None, prompt: str
) -> AsyncIterator[None]:
    """Around one call of a Pool's model ``step``: the step's first call runs at once
    and its others wait for it to end (nothing waits outside a primed Pool run)."""
    primers = STEP_PRIMERS.get()
    if primers is None or not (primers.force or _step_caches(llm, system, prompt)):
        yield
        return
    gate = primers.gates.get(id(step))
    if gate is None:
        primers.gates[id(step)] = gate = asyncio.Event()
        try:
            yield
        finally:
            gate.set()
        return
    await gate.wait()
    yield
