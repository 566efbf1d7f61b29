"""fanflow.run from synchronous code: scripts, notebooks (a real IPython shell), and the
refusal to block the running loop of async code.

The notebook tests run the helper thread's loop in real time (it is a fresh loop, not
the test's); they wait on real events, bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from IPython.core.interactiveshell import InteractiveShell

import fanflow
from fanflow import Request


@pytest.fixture
def notebook() -> Iterator[InteractiveShell]:
    """An active IPython shell in this process, as in a Jupyter kernel."""
    shell = InteractiveShell.instance()
    try:
        yield shell
    finally:
        InteractiveShell.clear_instance()


def test_run_in_a_script_makes_its_own_loop() -> None:
    llm = fanflow.function(lambda r: r.prompt[::-1])
    assert fanflow.run(fanflow.map(llm, "{input}", ["abc"])).outputs == ["cba"]


async def test_run_in_a_notebook_cell_runs_on_a_helper_thread(notebook: InteractiveShell) -> None:
    seen: list[str] = []

    def answer(request: Request) -> str:
        seen.append(threading.current_thread().name)
        return request.prompt.upper()

    # A running loop (this test's) is in this thread, as in a notebook cell.
    result = fanflow.run(lambda: fanflow.map(fanflow.function(answer), "{input}", ["a"]))
    assert result.outputs == ["A"]
    assert fanflow.ParallelCalls(fanflow.function(answer)).run(["b"]).outputs == ["B"]
    assert seen
    assert "MainThread" not in seen


async def test_run_from_async_code_outside_a_notebook_raises_with_the_fix() -> None:
    llm = fanflow.function(lambda r: r.prompt)
    with pytest.raises(fanflow.ConfigError, match=r"from async code.*await fanflow\.map"):
        fanflow.run(fanflow.map(llm, "{input}", ["a"]))  # the coroutine is closed, unrun
    with pytest.raises(fanflow.ConfigError, match=r"await pool\.arun\(\)"):
        fanflow.Pool(lambda x: x, [{"x": 1}]).run()


async def test_interrupting_a_notebook_run_cancels_its_calls(notebook: InteractiveShell) -> None:
    started: list[float] = []
    lock = threading.Lock()
    ten_started = threading.Event()

    async def slow(request: Request) -> str:
        with lock:
            started.append(time.monotonic())
            if len(started) == 10:
                ten_started.set()
        await asyncio.sleep(0.05)
        return request.prompt

    llm = fanflow.function(slow, name="slow")
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def interrupt() -> None:  # what Jupyter's stop button does: SIGINT to the kernel
        if ten_started.wait(30):
            signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    # ipykernel runs a cell with Python's default SIGINT handler (KeyboardInterrupt in
    # the main thread); the test's own loop runner had put one of its own.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            fanflow.run(fanflow.map(llm, "{input}", range(10_000), concurrency=5))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - began < 30  # it returned promptly, not after 10,000 calls
    at_interrupt = len(started)
    assert 10 <= at_interrupt < 10_000
    assert not any(t.name == "fanflow-run" for t in threading.enumerate())
    # Six call-lengths (this test blocks its own loop, as the notebook cell did): a
    # helper still running would start about 30 more calls meanwhile.
    time.sleep(0.3)  # noqa: ASYNC251
    assert len(started) == at_interrupt


def test_sync_run_is_the_async_run_of_the_object_it_is_called_on() -> None:
    # One helper makes every sync run(); it must call the object's own arun (a
    # subclass's too) with the arguments given, and keep arun's signature for help().
    class Loud(fanflow.Skill):
        async def arun(self, *args: object, **kwargs: object) -> fanflow.results.SkillResult:
            result = await super().arun(*args, **kwargs)  # type: ignore[arg-type]
            return fanflow.results.SkillResult(result.status, value=f"{result.value}!")

    llm = fanflow.function(lambda r: r.prompt.upper())
    assert fanflow.Skill(llm, "{x}").run({"x": "hi"}).value == "HI"
    assert Loud(llm, "{x}").run(x="hi").value == "HI!"
    assert fanflow.Skill.run.__name__ == "run"
    assert "progress" in inspect.signature(fanflow.Pool.run).parameters
