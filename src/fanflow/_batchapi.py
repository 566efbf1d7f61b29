"""What the batch backend needs of a provider's batch API (providers implement it).

:class:`BatchAPI` is the seam between the batch backend (``backends/_batch.py``) and a
provider's batch endpoints (``providers/_batchapi.py``): submit, poll, read results,
cancel, and find a batch by the token in its metadata. Its small types
(:class:`BatchState`, :class:`BatchLine`) are one shape for every API.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from ._exceptions import ProviderError
from ._llm import BaseLLM
from ._types import Request, Response

__all__ = ["BatchAPI", "BatchLine", "BatchState"]

LineKind = Literal["succeeded", "errored", "expired", "canceled"]


@dataclass(frozen=True, slots=True)
class BatchState:
    """One batch as the provider last reported it, in one shape for both APIs.

    Attributes:
        id: the provider's batch id.
        status: the provider's own status word (``in_progress``, ``ended``, ...).
        ended: processing has ended (completed, expired, cancelled or failed): its
            results can be read.
        total: requests in the batch.
        done: requests processed so far (succeeded + errored), when the API reports
            progress (OpenAI does; Anthropic tallies only at the end).
        failed_reason: why the whole batch failed (validation), or None.
        refs: where the results are (file ids, or the results URL).
    """

    id: str
    status: str
    ended: bool
    total: int
    done: int = 0
    failed_reason: str | None = None
    refs: tuple[str | None, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchLine:
    """The result of one request of a batch.

    ``kind`` is ``succeeded`` (``response`` set), ``errored`` (``error`` set, classified
    like a real-time error), ``expired`` or ``canceled`` (never processed).
    """

    custom_id: str
    kind: LineKind
    response: Response | None = None
    error: ProviderError | None = None
    batch_id: str | None = None


class BatchAPI(ABC):
    """A handle's batch endpoints (made by ``handle.batches()``)."""

    #: Documented limits per batch: requests, and bytes of the file or body.
    max_requests: ClassVar[int]
    max_bytes: ClassVar[int]
    #: What each request line costs beyond its own body (for size accounting).
    line_overhead: ClassVar[int] = 128

    def __init__(self, llm: BaseLLM) -> None:
        self.llm = llm

    @property
    def provider(self) -> str:
        """The provider's name, for messages."""
        return str(getattr(self.llm, "provider", type(self.llm).__name__))

    def takes_id(self, custom_id: str) -> bool:
        """Whether the API accepts ``custom_id`` as a line's id (else the cache key goes)."""
        return bool(custom_id)

    @abstractmethod
    def line(self, custom_id: str, request: Request) -> bytes:
        """One request as it goes into the batch (a JSONL line, or a JSON object)."""

    @abstractmethod
    async def submit(self, lines: Sequence[bytes], metadata: Mapping[str, str]) -> BatchState:
        """Create a batch of ``lines``; return its first state."""

    @abstractmethod
    async def poll(self, batch_id: str) -> BatchState:
        """The batch's current state."""

    @abstractmethod
    async def results(self, state: BatchState) -> list[BatchLine]:
        """Every result line of an ended batch (lines that are not JSON are skipped)."""

    @abstractmethod
    async def cancel(self, batch_id: str) -> BatchState:
        """Ask the provider to stop the batch; return its state."""

    async def find(self, token: str) -> BatchState | None:
        """The batch submitted with ``metadata={"fanflow_token": token}``, if the provider
        has one (after a create whose reply was lost). None when the API keeps no
        metadata (Anthropic)."""
        return None
