"""fanflow.local()'s worker processes: a native crash never takes the caller down.

Workers are killed for real, with the signal a crash or the OOM killer would send, in the
middle of a real generation; the call must be retried on a new worker and succeed, with
the pytest process unharmed and no process left behind. These tests wait on real events
(a worker streaming tokens, a process exiting), each bounded.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fanflow

from ._procs import alive, running, wait_for

local_module = importlib.import_module("fanflow.providers._local")
QUICK_RETRY = fanflow.RetryPolicy(attempts=4, initial=0.05)
LONG = "Write a long, detailed essay about the history of the Roman Empire."


@pytest.mark.parametrize(
    ("signum", "named"),
    [(signal.SIGSEGV, "signal 11"), (signal.SIGKILL, "signal 9")],
)
async def test_a_worker_killed_mid_generation_is_replaced_and_the_call_retried(
    signum: int, named: str
) -> None:
    async with fanflow.local(instances=1, threads=1, retry=QUICK_RETRY) as llm:
        await llm.load()
        await llm.complete(fanflow.Request.of("Hi", max_tokens=2))  # a call has succeeded
        (victim,) = llm.pool_statistics().pids
        call = asyncio.create_task(
            fanflow.call(llm, LONG, temperature=0.0, seed=7, max_tokens=40).record()
        )
        before = llm.pool_statistics().output_tokens
        await wait_for(lambda: llm.pool_statistics().output_tokens > before + 2, "tokens to stream")
        os.kill(victim, signum)
        record = await call
        stats = llm.pool_statistics()
        assert record.status is fanflow.Status.SUCCEEDED, record.error
        assert record.usage.output_tokens == 40
        first, second = record.attempts
        assert isinstance(first.error, fanflow.errors.ServerError)
        message = str(first.error)
        assert message.startswith(f"the local model's worker process died ({named})")
        assert "during the call" in message
        assert second.error is None
        assert stats.restarts == 1
        (replacement,) = stats.pids
        assert replacement != victim
        assert not alive(victim)  # reaped, not a zombie
        # The same request on the new worker, from scratch, gives the same text.
        again = await llm.complete(fanflow.Request.of(LONG, temperature=0.0, seed=7, max_tokens=40))
        assert again.text == record.value.text  # type: ignore[union-attr]
    assert not alive(replacement)  # aclose stopped it


async def test_a_crash_ends_only_the_attempt_on_that_worker() -> None:
    async with fanflow.local(instances=2, threads=1, retry=QUICK_RETRY) as llm:
        await llm.load()
        victim = llm.pool_statistics().pids[0]
        calls = [
            asyncio.create_task(
                fanflow.call(llm, LONG, temperature=0.0, seed=s, max_tokens=40).record()
            )
            for s in (1, 2)
        ]
        await wait_for(lambda: llm.pool_statistics().busy == 2, "both workers to start")
        await wait_for(lambda: llm.pool_statistics().output_tokens > 4, "tokens to stream")
        os.kill(victim, signal.SIGSEGV)
        records = await asyncio.gather(*calls)
        stats = llm.pool_statistics()
    assert all(r.status is fanflow.Status.SUCCEEDED for r in records)
    # The call on the other worker never noticed; the one on the victim ran again.
    assert sorted(len(r.attempts) for r in records) == [1, 2]
    assert stats.restarts == 1
    assert victim not in stats.pids
    assert len(stats.pids) == 2


async def test_a_hung_worker_is_killed_when_its_call_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local_module, "CANCEL_GRACE", 0.5)
    async with fanflow.local(instances=1, threads=1) as llm:
        await llm.load()
        (victim,) = llm.pool_statistics().pids
        call = asyncio.create_task(llm.complete(fanflow.Request.of(LONG, max_tokens=300)))
        await wait_for(lambda: llm.pool_statistics().output_tokens > 0, "tokens to stream")
        os.kill(victim, signal.SIGSTOP)  # hung: it will never read the cancel
        call.cancel()  # as a timeout would
        with pytest.raises(asyncio.CancelledError):
            await call
        stats = llm.pool_statistics()
        assert stats.restarts == 1
        assert stats.pids == ()
        assert not alive(victim)  # killed and reaped
        response = await llm.complete(fanflow.Request.of("Hi", max_tokens=2))  # a new one
        assert response.usage.output_tokens >= 1


async def test_workers_that_keep_dying_while_loading_give_a_config_error() -> None:
    llm = fanflow.local(instances=1, threads=1, retry=QUICK_RETRY, extra_buffers=True)
    killed: list[int] = []

    async def kill_each_worker_while_it_loads() -> None:
        while True:
            stats = llm.pool_statistics()
            for pid in stats.pids:
                if pid not in killed and stats.loaded == 0:
                    os.kill(pid, signal.SIGSEGV)
                    killed.append(pid)
            await asyncio.sleep(0.002)

    killer = asyncio.create_task(kill_each_worker_while_it_loads())
    try:
        record = await fanflow.call(llm, "Hi", max_tokens=2).record()
        later = await fanflow.call(llm, "Hi", max_tokens=2).record()
    finally:
        killer.cancel()
        await asyncio.gather(killer, return_exceptions=True)
    assert record.status is fanflow.Status.FAILED
    assert [type(a.error) for a in record.attempts] == [
        fanflow.errors.ServerError,
        fanflow.errors.ServerError,
        fanflow.ConfigError,
    ]
    assert "died (signal 11) while loading the model" in str(record.attempts[0].error)
    message = str(record.error)
    assert "died 3 times in a row while loading or on its first call" in message
    assert "extra buffer types" in message
    assert "fanflow.local(extra_buffers=False)" in message
    assert "FANFLOW_LOCAL_EXTRA_BUFFERS=0" in message
    # Fail fast: the next call starts no worker and says the same.
    assert isinstance(later.error, fanflow.ConfigError)
    assert len(later.attempts) == 1
    assert len(killed) == 3
    assert not any(alive(pid) for pid in killed)
    # aclose forgets the verdict: a fresh start (nobody killing it now) works.
    await llm.aclose()
    response = await llm.complete(fanflow.Request.of("Hi", max_tokens=2))
    assert response.usage.output_tokens >= 1
    await llm.aclose()


def test_the_config_error_says_what_to_try_when_extra_buffers_are_already_off() -> None:
    llm = fanflow.local(instances=1, extra_buffers=False)
    assert "extra buffer types are already off" in llm._likely_cause()
    assert "fewer instances=" in llm._likely_cause()


async def test_a_call_cancelled_while_its_worker_loads_returns_at_once() -> None:
    fresh = fanflow.local(instances=1, threads=1)
    task = asyncio.create_task(fresh.complete(fanflow.Request.of("Hi", max_tokens=2)))
    await wait_for(lambda: fresh.pool_statistics().pids, "a worker to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker goes on loading and serves the next call.
    response = await fresh.complete(fanflow.Request.of("Hi", max_tokens=2))
    assert response.usage.output_tokens >= 1
    await fresh.aclose()


SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import fanflow

    # No `if __name__ == "__main__":` guard, on purpose: workers must not run this again.
    async def main():
        llm = fanflow.local(instances=2, threads=1)
        await llm.load()
        print(" ".join(map(str, llm.pool_statistics().pids)), flush=True)
        if sys.argv[1] == "hang":
            await llm.complete(fanflow.Request.of(
                "Write a long essay about the sea.", temperature=0.0, max_tokens=2000))
        else:
            reply = await llm.complete(fanflow.Request.of("Hi", max_tokens=2))
            print(reply.usage.output_tokens, flush=True)
        # no aclose(): exit must not leave the workers behind

    asyncio.run(main())
    """
)


def run_script(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_interpreter_exit_without_aclose_leaves_no_worker(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "exit")
    out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 0, err
    pids_line, tokens = out.split("\n")[:2]
    pids = [int(p) for p in pids_line.split()]
    assert len(pids) == 2
    assert int(tokens) >= 1
    assert "Traceback" not in err
    # Stopped and reaped by the script as it exited (not orphaned, left to notice later).
    assert not any(alive(pid) for pid in pids)


async def test_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "hang")
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2
    await asyncio.sleep(0.3)  # let one worker get into its generation
    proc.kill()  # SIGKILL: no atexit, no finalizers, nothing of the parent runs
    await asyncio.to_thread(proc.wait)
    for pid in pids:
        await wait_for(lambda pid=pid: not running(pid), f"orphaned worker {pid} to exit", 10)
    proc.stdout.close()
    assert proc.stderr is not None
    proc.stderr.close()
