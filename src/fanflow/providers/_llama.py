"""One llama.cpp model instance and one generation: the code a worker process runs.

Nothing here runs in the user's process: ``fanflow.local()`` starts worker processes
(``_worker.py``) and each loads one :class:`Instance`. A generation streams token by
token and asks ``should_stop`` before each token, so a cancelled call stops at the next
token instead of running to ``max_tokens``.

A call reuses the KV cache for the prefix its prompt shares with the previous call on the
same instance (llama.cpp's ``generate`` does this): a map's prompts share the chat template
and the system prompt (docs/decisions/0050).
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import BadRequest, ConfigError
from .._types import Request, Response, Usage

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["Instance", "Settings", "extra_buffer_types"]

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
# back again, and the extra-buffer switch below patches a module attribute while loading:
# both are process-wide, so loads in one process go one at a time.
_LOADING = threading.Lock()

# "load_tensors:   CPU_REPACK model buffer size =    27.00 MiB": which buffer types the
# weights went into. CPU_REPACK and AMX are llama.cpp's extra buffer types.
_BUFFER_LINE = re.compile(r"(\S+) model buffer size")


@dataclass(frozen=True, slots=True)
class Settings:
    """How each instance is loaded.

    Attributes:
        path: the GGUF file.
        n_ctx: the context size in tokens.
        threads: CPU threads for generation and prompt processing.
        chat_template: a Jinja chat template, or None for the file's own (else ChatML).
        extra_buffers: let llama.cpp repack weights into its extra buffer types
            (``use_extra_bufts``: CPU_REPACK, AMX). Off on CPUs with AMX: see
            docs/decisions/0080.
    """

    path: Path
    n_ctx: int
    threads: int
    chat_template: str | None
    extra_buffers: bool = True


class Instance:
    """One loaded model. Used by one thread at a time.

    Attributes:
        n_ctx: the context that fits (prompt plus reply), in tokens.
        name: the model's name (the file's stem).
        buffers: the buffer types llama.cpp loaded the weights into, in the order it
            reported them (e.g. ``("CPU_Mapped", "CPU_REPACK")``).
    """

    def __init__(self, settings: Settings) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        log: list[str] = []
        with _LOADING, _capture_log(llama_cpp, log), extra_buffer_types(settings.extra_buffers):
            try:
                self.model: Llama = llama_cpp.Llama(
                    model_path=str(settings.path),
                    n_ctx=settings.n_ctx,
                    n_threads=settings.threads,
                    n_threads_batch=settings.threads,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as exc:
                detail = _last_error(log)
                raise ConfigError(
                    f"llama.cpp could not load {settings.path}: {exc}"
                    + (f" ({detail})" if detail else "")
                    + "; pass path= a GGUF model file that llama.cpp supports"
                ) from exc
        self.buffers = tuple(dict.fromkeys(_BUFFER_LINE.findall("".join(log))))
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

    def generate(
        self,
        request: Request,
        should_stop: Callable[[], bool],
        on_token: Callable[[int], None] | None = None,
    ) -> Response:
        """Generate a reply to ``request``.

        Args:
            request: the request.
            should_stop: asked before each token; True ends the generation early (its
                finish reason is then ``"cancelled"``).
            on_token: called with each generated token's id, as it is generated.

        The reply's ``service_time`` is this generation's time, from here to the end.
        """
        began = time.perf_counter()
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
                if should_stop():
                    finish = "cancelled"
                    break
                token = next(tokens)
                if is_eog(vocab, token):
                    finish = "stop"
                    break
                out.append(token)
                if on_token is not None:
                    on_token(token)
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
            service_time=time.perf_counter() - began,
        )


def _first_stop(text: bytes, stops: list[bytes]) -> int | None:
    """Where the earliest stop sequence in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


@contextlib.contextmanager
def extra_buffer_types(enabled: bool) -> Iterator[None]:
    """Load models with llama.cpp's extra buffer types on or off, within this block, in
    this process (a worker; or the llama.cpp server the end-to-end tests start).

    ``Llama()`` takes no argument for ``llama_model_params.use_extra_bufts``; it starts
    from ``llama_model_default_params()``, looked up on the ``llama_cpp.llama_cpp`` module
    at each load. So, while loading, that function returns the defaults with the flag set.
    """
    from llama_cpp import llama_cpp as low

    fields = {name for name, *_ in low.llama_model_params._fields_}
    if "use_extra_bufts" not in fields:
        if enabled:  # what llama.cpp does anyway
            yield
            return
        raise ConfigError(
            "this llama-cpp-python cannot turn llama.cpp's extra buffer types off "
            "(llama_model_params has no use_extra_bufts), which this CPU needs; upgrade it "
            "with: pip install -U 'llama-cpp-python>=0.3.16'"
        )
    original = low.llama_model_default_params

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = enabled
        return params

    low.llama_model_default_params = default_params
    try:
        yield
    finally:
        low.llama_model_default_params = original


@contextlib.contextmanager
def _capture_log(llama_cpp: Any, lines: list[str]) -> Iterator[None]:
    """Collect llama.cpp's log lines while loading (they name the buffer types used and,
    on failure, why), instead of printing them."""

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        from llama_cpp import _logger  # llama-cpp-python's own callback, set at import

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _last_error(log: list[str]) -> str:
    """The last line of llama.cpp's log that says what went wrong, if any."""
    for line in reversed("".join(log).splitlines()):
        text = line.strip()
        if "error" in text.lower() or "failed" in text.lower():
            return text
    return ""
