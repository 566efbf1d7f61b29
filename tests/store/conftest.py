"""A loopback model server for the crash tests, and the child script that uses it.

The server answers a first batch of requests at once and holds the rest until
released, so a test can kill the client while calls are in flight at a known point,
without timing guesses. It counts every request per prompt (its stats are the judge
of "no completed call was repeated").
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


class HoldingServer:
    """Answers the first ``answer_first`` requests; holds later ones until released."""

    def __init__(self, answer_first: int) -> None:
        self.answer_first = answer_first
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.answered: list[str] = []
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["prompt"]
                with server.lock:
                    server.received[prompt] += 1
                    hold = len(server.answered) >= server.answer_first
                    if not hold:
                        server.answered.append(prompt)
                if hold:
                    server.released.wait()
                    with server.lock:
                        server.answered.append(prompt)
                payload = json.dumps({"text": f"answer to {prompt}"}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client is gone (killed or cancelled)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def release(self) -> None:
        """Answer everything from now on, the held requests too."""
        with self.lock:
            self.answer_first = 10**9
        self.released.set()

    def answered_prompts(self) -> list[str]:
        with self.lock:
            return list(self.answered)

    def __enter__(self) -> HoldingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


CHILD = r"""
import asyncio, json, sys
import fanflow

port, store_path, out_path, n, job = (
    int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
)


async def ask(request):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = json.dumps({"prompt": request.prompt}).encode()
        writer.write(
            b"POST /complete HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    return json.loads(data.partition(b"\r\n\r\n")[2])["text"]


async def main():
    items = [{"id": f"id-{i}", "input": f"prompt {i}"} for i in range(n)]
    with fanflow.Store(store_path) as store:
        result = await fanflow.map(
            fanflow.function(ask, name="sim"), "{input}", items,
            concurrency=6, store=store, job=job, sink=out_path,
        )
    print(json.dumps({"succeeded": result.summary.succeeded, "calls": result.summary.calls}))


asyncio.run(main())
"""


@pytest.fixture
def child_script(tmp_path: Path) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return [sys.executable, str(path)]


@pytest.fixture
def holding_server() -> type[HoldingServer]:
    return HoldingServer
