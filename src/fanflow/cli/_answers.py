"""The answer to a request line, in the shape its line came in.

- A Batch API input line is answered with a line of the Batch API's output file:
  ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
  (``body`` a chat completion, or ``{"error": ...}`` with the provider's status code;
  ``response`` null and ``error`` ``{"code", "message"}`` when no HTTP answer came: a
  timeout, a skipped or unreadable item). Code that reads batch results reads these.
- A bare chat-completions body (the OpenAI cookbook's request file) is answered as
  ``api_request_parallel_processor.py`` writes: ``[request, response, metadata]``
  (``metadata`` only when the line had one), and ``[request, [errors], metadata]``
  when it failed.

``request_id`` is the provider's id of the request where its reply named one (OpenAI's
``x-request-id`` header, Anthropic's ``request-id``), else fanflow's (``req_`` and the
request's key: a stored, batched or simulated answer).
"""

from __future__ import annotations

import re
import time
from typing import Any

from .._exceptions import ProviderError
from .._types import CallRecord, Response
from ..patterns._requests import RequestLine
from ..providers._http import REQUEST_ID

__all__ = ["answer", "completion_body"]


def completion_body(response: Response, key: str) -> dict[str, Any]:
    """The chat completion that answered: the provider's own JSON when it was kept,
    else one rebuilt from the response (a streamed, batched or stored answer)."""
    raw = response.raw
    if isinstance(raw, dict) and isinstance(raw.get("choices"), list):
        return raw
    usage = response.usage
    return {
        "id": f"chatcmpl-fanflow-{key[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model or "",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": response.text},
                "finish_reason": response.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        },
    }


def _code(error: BaseException) -> str:
    """``CallTimeout`` -> ``call_timeout``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


def _error_text(error: BaseException) -> str:
    from ._settings import for_cli

    return for_cli(f"{type(error).__name__}: {error}")


def _provider_id(record: CallRecord[Any]) -> str | None:
    """The provider's id of the request that answered (its reply's header), if it gave one."""
    named = record.response.extra if record.response is not None else None
    if named is None and isinstance(record.error, ProviderError):
        named = record.error.extra
    value = (named or {}).get(REQUEST_ID)
    return value if isinstance(value, str) else None


def _batch_answer(line: RequestLine, record: CallRecord[Any], index: int) -> dict[str, Any]:
    key = record.request.key if record.request is not None else line.request.key
    out: dict[str, Any] = {
        "id": f"batch_req_{index}_{key[:16]}",
        "custom_id": line.custom_id,
        "response": None,
        "error": None,
    }
    error = record.error
    request_id = _provider_id(record) or f"req_{key[:32]}"
    if record.response is not None and error is None:
        body = completion_body(record.response, key)
        out["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    elif isinstance(error, ProviderError) and error.status_code:
        problem = {"message": _error_text(error), "type": _code(error), "param": None, "code": None}
        out["response"] = {
            "status_code": error.status_code,
            "request_id": request_id,
            "body": {"error": problem},
        }
    else:
        error = error or RuntimeError(f"the call ended {record.status}")
        out["error"] = {"code": _code(error), "message": _error_text(error)}
    return out


def _cookbook_answer(line: RequestLine, record: CallRecord[Any]) -> list[Any]:
    request = dict(line.request.body or {})
    if record.response is not None and record.error is None:
        key = record.request.key if record.request is not None else line.request.key
        result: Any = completion_body(record.response, key)
    else:
        error = record.error or RuntimeError(f"the call ended {record.status}")
        result = [_error_text(error)]
    return [request, result, line.metadata] if line.metadata else [request, result]


def answer(line: RequestLine, record: CallRecord[Any]) -> Any:
    """The JSONL answer of one request line, in its line's shape."""
    assert record.index is not None
    if line.shape == "batch":
        return _batch_answer(line, record, record.index)
    return _cookbook_answer(line, record)
