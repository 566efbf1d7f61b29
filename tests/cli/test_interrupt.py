"""Ctrl-C always ends a run with exit 130 and the resume hint (issue 13 item 11).

The rare crash (about one Ctrl-C in 160) was asyncio.run's SIGINT handler running in the
middle of ``asyncio.Queue.put_nowait``: between ``waiter.done()`` and
``waiter.set_result(None)`` it cancelled the getter being woken (the CLI's main task,
waiting for the map's next record), so ``set_result`` raised InvalidStateError in the
producer. The first test puts the signal exactly there, every time; the second sends
Ctrl-C at random moments to real runs.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

Env = Callable[[Mapping[str, str] | None], dict[str, str]]

# Runs the real CLI with one change to asyncio: the future a Queue.get() waits on raises
# SIGINT from inside the ``done()`` check of the put that wakes it (after reading its
# state), which is the exact moment of the race.
RACE = r"""
import asyncio, signal, sys


class Tripwire(asyncio.Future):
    armed = True

    def done(self):
        done = super().done()
        caller = sys._getframe(1).f_code.co_name
        if Tripwire.armed and not done and caller == "_wakeup_next":
            Tripwire.armed = False
            signal.raise_signal(signal.SIGINT)  # Python runs its handler right here
        return done


create_future = asyncio.BaseEventLoop.create_future


def patched(loop):
    code = sys._getframe(1).f_code
    if code.co_name == "get" and code.co_filename.endswith("queues.py"):
        return Tripwire(loop=loop)
    return create_future(loop)


asyncio.BaseEventLoop.create_future = patched

from fanflow.cli import main

code = main(sys.argv[1:])
assert not Tripwire.armed, "the race was not provoked"
raise SystemExit(code)
"""


def test_ctrl_c_in_the_middle_of_a_queue_wakeup_exits_130(tmp_path: Path, cli_env: Env) -> None:
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(200)))
    done = subprocess.run(
        [sys.executable, "-c", RACE, "map", "in.txt", "-p", "{input}", "--provider", "sim",
         "--sim", "latency=0.01", "--concurrency", "4", "--job", "race", "-o", "out.jsonl"],
        cwd=tmp_path, env=cli_env(None), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "InvalidStateError" not in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, done.stderr
    assert "fanflow: interrupted; " in done.stderr
    assert "Finished items are saved in job 'race'; to resume: fanflow map in.txt" in done.stderr


def _interrupt_once(folder: Path, delay: float, env: dict[str, str]) -> tuple[int, str]:
    folder.mkdir()
    (folder / "in.txt").write_text("".join(f"item {i}\n" for i in range(400)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanflow", "map", "in.txt", "-p", "{input}", "--provider",
         "sim", "--sim", "latency=0.1", "--concurrency", "16", "--job", "j",
         "--progress", "none"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first row: the run is under way
        time.sleep(delay)  # a random moment of a run that lasts about 2.5 s more
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_at_random_moments_always_exits_130(tmp_path: Path, cli_env: Env) -> None:
    moments = random.Random(13).choices([0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.7, 1.2], k=30)
    env = cli_env(None)
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda n: _interrupt_once(tmp_path / f"run{n}", moments[n], env),
                range(len(moments)),
            )
        )
    for (code, err), moment in zip(results, moments, strict=True):
        assert "Traceback" not in err, (moment, err)
        assert code == 130, (moment, err)
        assert "to resume: fanflow map in.txt" in err, (moment, err)


# The same race for a Python user of fanflow.as_completed under plain asyncio.run.
LIBRARY = r"""
import asyncio, sys
import fanflow

exec(open(sys.argv[1]).read().split("from fanflow.cli import main")[0])  # the tripwire


async def main():
    llm = fanflow.function(lambda request: request.prompt, name="echo")
    async with fanflow.as_completed(llm, "{input}", [str(i) for i in range(50)]) as stream:
        async for record in stream:
            await asyncio.sleep(0)


try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted")
assert not Tripwire.armed, "the race was not provoked"
"""


def test_as_completed_under_asyncio_run_survives_the_same_race(
    tmp_path: Path, cli_env: Env
) -> None:
    (tmp_path / "race.py").write_text(RACE)
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY, str(tmp_path / "race.py")],
        cwd=tmp_path, env=cli_env(None), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout == "interrupted\n"
    assert done.returncode == 0
