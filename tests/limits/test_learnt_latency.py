"""The latency a handle observed is learnt once (issue 27 part 2): a new process hedges a
slow first call with the delay that an earlier one measured against the same server.

Real time (two ``fanflow.run`` loops, as two processes would be): the server answers in
0.1 s, and one call of the second run never answers unless it is hedged. The second run
has 60 calls, so the hedging cap (5% of the calls) leaves room for two hedges of calls
that a loaded machine made slow before the one that hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fanflow
from fanflow import Limits
from fanflow.testing import SimRequest, SimServer


def _hang_once(prompt: str) -> Callable[[SimRequest], str | None]:
    seen: set[str] = set()

    def fault(request: SimRequest) -> str | None:
        if prompt in request.prompt and prompt not in seen:
            seen.add(prompt)
            return "hang"
        return None

    return fault


def _handle(server: SimServer, url: str) -> fanflow.BaseLLM:
    return fanflow.openai(
        "sim", base_url=server.url, api_key="sk-test", limits=Limits(rpm=60_000, shared=url)
    )


def test_a_new_process_hedges_with_the_delay_another_measured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}"
    with SimServer(latency=0.1, fault_on=_hang_once("item 25 of the second run")) as server:
        # The first run lasts about 3 s (a lane publishes at most once a second) and sees
        # many more answers than the hedger needs to trust its quantile.
        first = fanflow.run(
            fanflow.map(
                _handle(server, url), "{input}", [f"a{i}" for i in range(1200)], concurrency=40
            )
        )
        assert first.ok
        # A new handle on a new loop: its own hedger has seen no answer when item 25
        # is due (all 60 start at once), so only the learnt delay can hedge it.
        items = [f"item {i} of the second run" for i in range(60)]
        second = fanflow.run(fanflow.map(_handle(server, url), "{input}", items, timeout=30.0))
    assert second.ok
    slow = second.records[25]
    assert any(a.hedge for a in slow.attempts)
    assert slow.retries == 0  # answered by the hedge, not retried after its 30 s timeout


def test_a_handle_on_a_new_loop_hedges_with_the_delay_it_measured_before() -> None:
    # One process, one handle, two fanflow.run loops: the lane of the second loop starts
    # from the first's (Lane.inherit), hedging delay included.
    with SimServer(latency=0.1, fault_on=_hang_once("item 25 of the second run")) as server:
        llm = fanflow.openai("sim", base_url=server.url, api_key="sk-test")
        first = fanflow.run(fanflow.map(llm, "{input}", [f"a{i}" for i in range(200)]))
        assert first.ok
        items = [f"item {i} of the second run" for i in range(60)]
        second = fanflow.run(fanflow.map(llm, "{input}", items, timeout=30.0))
    assert second.ok
    slow = second.records[25]
    assert any(a.hedge for a in slow.attempts)
    assert slow.retries == 0
