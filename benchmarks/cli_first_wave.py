"""The command's first wave against nginx: ``fanflow map`` with no limits given.

SimServer (100 ms a call) behind nginx's ``limit_req`` (50 r/s, ``burst=50 nodelay``, a
429 with no headers and no Retry-After; ``tests/_nginx.py``), and ``fanflow map`` over
300 items in a subprocess with ``OPENAI_BASE_URL`` at nginx. Prints nginx's refusals
(from its error log) and the wall time of each run. Issue 27 part 3 asks for at most a
few dozen refusals (decision 0313).

    python benchmarks/cli_first_wave.py [--runs 8] [--items 300]

Real time: run it on an idle machine, and compare codes in the same session
(``PYTHONPATH=<tree>/src`` selects the code the subprocess runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/_nginx.py
from tests._nginx import NginxLimitReq, nginx_path

from fanflow.testing import SimServer


async def one_run(folder: Path, items: int) -> tuple[int, float, int]:
    """(nginx's refusals, wall seconds, the command's exit status) of one run."""
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps({"text": f"item {i}"}) + "\n" for i in range(items)))
    async with SimServer(keep_requests=False, latency=0.1) as server:
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        async with NginxLimitReq(port, "50r/s", burst=50, nodelay=True) as proxy:
            env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": proxy.url}
            start = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fanflow", "map", str(path), "-p", "{text}",
                "--model", "m", "-o", str(folder / "out.jsonl"),
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await proc.communicate()
            wall = time.monotonic() - start
            refused = proxy.refused()
    if proc.returncode != 0:
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    return refused, wall, proc.returncode or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--items", type=int, default=300)
    args = parser.parse_args()
    if nginx_path() is None:
        sys.exit("nginx is not installed: apt-get install -y nginx")
    print(f"fanflow map, {args.items} items, nginx 50r/s burst=50 nodelay, no limits given")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    refusals = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            refused, wall, status = asyncio.run(one_run(Path(folder), args.items))
        refusals.append(refused)
        print(f"run {run + 1}: {refused} refusals, {wall:.2f} s, exit {status}")
    print(
        f"refusals: {min(refusals)}-{max(refusals)}, median {sorted(refusals)[len(refusals) // 2]}"
    )


if __name__ == "__main__":
    main()
