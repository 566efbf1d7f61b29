"""Run the request files you already have, as they are (offline, SimServer).

    python examples/bring_your_own_requests.py

An OpenAI Batch API input file (``custom_id``, ``method``, ``url``, ``body`` a line) and
the OpenAI cookbook's request file (one chat-completions body a line, with its own
``metadata``) run through fanflow as written: each line's own model, messages (tool
turns too) and parameters. The library reads them with ``fanflow.read_requests`` and
runs them with ``fanflow.map(llm, requests)``; the command line, ``fanflow map FILE``
without ``-p``, answers each line in its own shape: the Batch API's output format, or
the cookbook's ``[request, response, metadata]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import fanflow
from fanflow.testing import SimServer

QUESTIONS = ["Name a colour.", "Name a fruit.", "Name a planet."]
MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o-mini"]


def write_files(folder: Path) -> tuple[Path, Path]:
    batch = folder / "batch_input.jsonl"
    cookbook = folder / "requests.jsonl"
    with batch.open("w") as b, cookbook.open("w") as c:
        for i, (question, model) in enumerate(zip(QUESTIONS, MODELS, strict=True)):
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": question},
                ],
                "max_completion_tokens": 20,
            }
            line = {"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions"}
            b.write(json.dumps({**line, "body": body}) + "\n")
            c.write(json.dumps({**body, "metadata": {"row": i}}) + "\n")
    return batch, cookbook


def in_the_library(server: SimServer, batch: Path) -> None:
    llm = fanflow.openai("gpt-4o-mini", base_url=server.url, api_key="sk-offline")
    result = fanflow.run(fanflow.map(llm, fanflow.read_requests(batch)))
    for record in result.records:
        print(f"  {record.request.metadata['custom_id']} ({record.request.model}): {record.value}")


def on_the_command_line(folder: Path, name: str) -> list[object]:
    done = subprocess.run(
        [sys.executable, "-m", "fanflow", "map", name, "--provider", "sim", "-q"],
        capture_output=True, text=True, check=True, cwd=folder,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines()]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, SimServer(latency=0.01) as server:
        folder = Path(tmp)
        batch, _ = write_files(folder)
        print("fanflow.map(llm, fanflow.read_requests('batch_input.jsonl')):")
        in_the_library(server, batch)
        print("fanflow map batch_input.jsonl (the Batch API's output format):")
        for line in on_the_command_line(folder, "batch_input.jsonl"):
            assert isinstance(line, dict)
            answer = line["response"]["body"]["choices"][0]["message"]["content"]
            print(f"  {line['custom_id']}: status {line['response']['status_code']}, {answer!r}")
        print("fanflow map requests.jsonl (the cookbook's [request, response, metadata]):")
        for line in on_the_command_line(folder, "requests.jsonl"):
            assert isinstance(line, list)
            request, response, metadata = line
            answer = response["choices"][0]["message"]["content"]
            print(f"  {metadata} {request['model']}: {answer!r}")


if __name__ == "__main__":
    main()
