"""``python -m fanflow.testing.sim`` starts a standalone SimServer (benchmarks use it)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import fanflow.testing


def test_public_names() -> None:
    assert set(fanflow.testing.__all__) == {
        "FAULTS",
        "Fault",
        "MockReply",
        "MockTransport",
        "ScriptedLLM",
        "SimBatches",
        "SimCache",
        "SimRequest",
        "SimSecond",
        "SimServer",
        "SimStats",
    }
    assert all(hasattr(fanflow.testing, name) for name in fanflow.testing.__all__)


def test_command_line_server_answers() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanflow.testing.sim", "--port", "0", "--rpm", "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        body = {"model": "m", "messages": [{"role": "user", "content": "cli"}]}
        req = urllib.request.Request(
            url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            reply = json.loads(r.read())
            limit = r.headers["x-ratelimit-limit-requests"]
        with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as r:
            stats = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert reply["choices"][0]["message"]["content"] == "echo: cli"
    assert limit == "100"
    assert stats["responses"] == {"200": 1}
