"""The thread side of ``fanflow.local()``: one llama.cpp model instance and one generation.

Everything here blocks and runs in a worker thread, never on the event loop. A
generation streams token by token and checks a cancel flag before each token, so a
cancelled call stops at the next token instead of running to ``max_tokens``.

A call reuses the KV cache for the prefix its prompt shares with the previous call on the
same instance (llama.cpp's ``generate`` does this): a map's prompts share the chat template
and the system prompt, and re-reading them for every item tripled the time per item on this
machine. Greedy outputs were identical with and without the reuse in every run we made
(tests and benchmarks compare a map with sequential calls).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import BadRequest, ConfigError
from .._types import Request, Response, Usage

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["Cancel", "Instance", "Settings"]

# ChatML, for GGUF files that carry no chat template of their own.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp's sampling defaults, used when a request leaves them unset.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
TOP_K = 40
MIN_P = 0.05

# llama-cpp-python silences loading by pointing file descriptors 1 and 2 at /dev/null and
# back again. Two loads at once interleave that dance and can leave stdout pointing at
# /dev/null for good (seen here: a script's output vanished after a 2-instance load), so
# instances load one at a time.
_LOADING = threading.Lock()


@dataclass(frozen=True, slots=True)
class Settings:
    """How each instance is loaded."""

    path: Path
    n_ctx: int
    threads: int
    chat_template: str | None


@dataclass(slots=True)
class Cancel:
    """A flag the event loop sets and the worker thread reads between tokens."""

    event: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0  # output tokens generated so far (written by the worker)

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class Instance:
    """One loaded model. Used by one thread at a time."""

    def __init__(self, settings: Settings) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        with _LOADING:
            try:
                self.model: Llama = llama_cpp.Llama(
                    model_path=str(settings.path),
                    n_ctx=settings.n_ctx,
                    n_threads=settings.threads,
                    n_threads_batch=settings.threads,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as exc:
                raise ConfigError(
                    f"llama.cpp could not load {settings.path}: {exc}; "
                    "pass path= a GGUF model file that llama.cpp supports"
                ) from exc
        model = self.model
        eos = model.token_eos()
        bos = model.token_bos()
        template = settings.chat_template or model.metadata.get("tokenizer.chat_template")
        self.formatter = Jinja2ChatFormatter(
            template=template or CHATML,
            eos_token=model._model.token_get_text(eos) if eos != -1 else "",
            bos_token=model._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
        # llama.cpp may round the context up, but the Python side's buffers hold only what
        # was asked for: the smaller of the two is what fits.
        self.n_ctx = min(settings.n_ctx, model.n_ctx())
        self.name = settings.path.stem

    def close(self) -> None:
        self.model.close()

    def prompt_tokens(self, request: Request) -> list[int]:
        """Apply the chat template and tokenize."""
        messages: Any = [{"role": m.role, "content": m.content} for m in request.messages]
        formatted = self.formatter(messages=messages)
        # list(...): typed whether or not llama_cpp's own stubs are installed.
        return list(
            self.model.tokenize(
                formatted.prompt.encode("utf-8"),
                add_bos=not formatted.added_special,
                special=True,
            )
        )

    def generate(self, request: Request, cancel: Cancel) -> Response:
        """Generate a reply to ``request``, stopping early if ``cancel`` is set."""
        if request.response_format is not None:
            raise BadRequest(
                "fanflow.local() does not support response_format yet; "
                "ask for JSON in the prompt and parse the reply instead"
            )
        model = self.model
        prompt = self.prompt_tokens(request)
        room = self.n_ctx - len(prompt)
        if room <= 0:
            raise BadRequest(
                f"fanflow.local(): the prompt has {len(prompt)} tokens but the model's "
                f"context holds {self.n_ctx}; shorten the prompt or pass a larger n_ctx="
            )
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        stops = [s.encode("utf-8") for s in request.stop or () if s]
        temperature = request.temperature
        top_p = request.top_p
        seed = request.seed if request.seed is not None else random.getrandbits(32)
        model.set_seed(seed)

        out: list[int] = []
        cut: int | None = None
        finish = "length"
        is_eog = self._llama_cpp.llama_vocab_is_eog
        vocab = model._model.vocab
        tokens = model.generate(
            prompt,
            top_k=TOP_K,
            top_p=DEFAULT_TOP_P if top_p is None else top_p,
            min_p=MIN_P,
            temp=DEFAULT_TEMPERATURE if temperature is None else temperature,
            repeat_penalty=1.0,
        )
        try:
            while len(out) < max_tokens:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                token = next(tokens)
                if is_eog(vocab, token):
                    finish = "stop"
                    break
                out.append(token)
                cancel.tokens = len(out)
                if stops:
                    cut = _first_stop(model.detokenize(out, prev_tokens=prompt), stops)
                    if cut is not None:
                        finish = "stop"
                        break
        finally:
            tokens.close()
        text = model.detokenize(out, prev_tokens=prompt)[:cut]
        return Response(
            text.decode("utf-8", errors="replace"),
            usage=Usage(len(prompt), len(out)),
            model=self.name,
            finish_reason=finish,
        )


def _first_stop(text: bytes, stops: list[bytes]) -> int | None:
    """Where the earliest stop sequence in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
