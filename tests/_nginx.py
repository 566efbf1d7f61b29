"""nginx's ``limit_req`` in front of an upstream: a third-party rate limiter for tests.

Limits are proven against a limiter fanflow did not write (docs/architecture.md,
promise 13). This starts Debian's nginx (``/usr/sbin/nginx``) as a reverse proxy on a
free loopback port, with a configuration generated into a temporary directory (pid
file, error log and temp paths there too), and stops it afterwards.

nginx's ``limit_req`` is a leaky bucket (``ngx_http_limit_req_module.c``): each request
adds 1 to an "excess" that drains at ``rate``, measured in whole milliseconds; a
request that would lift the excess above ``burst`` is refused (here with 429, by
``limit_req_status``). With ``nodelay`` the requests within the burst go at once;
without it they are held until they conform, so only the ones beyond the burst are
refused. With ``burst=0`` two requests closer than ``1 / rate`` apart are refused. Rates
are given per second or per minute (``r/s``, ``r/m``). nginx answers its 429 itself,
without a Retry-After.

A test harness, not shipped: fanflow's tests import it as ``.._nginx`` and the
benchmarks as ``tests._nginx`` (with the repository on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["NGINX", "NginxLimitReq", "nginx_path"]

NGINX = "/usr/sbin/nginx"


def nginx_path() -> str | None:
    """The nginx binary, or None when it is not installed."""
    if os.access(NGINX, os.X_OK):
        return NGINX
    return shutil.which("nginx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_CONFIG = """\
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    limit_req_zone $binary_remote_addr zone=fanflow:1m rate={rate};
    limit_req_status 429;
    upstream sim {{
        server 127.0.0.1:{upstream};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            limit_req zone=fanflow{burst}{nodelay};
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class NginxLimitReq:
    """nginx ``limit_req`` as a reverse proxy in front of ``upstream`` (a base URL's
    port on loopback).

    Args:
        upstream_port: the loopback port of the server behind nginx (SimServer).
        rate: nginx's rate, e.g. ``"20r/s"`` or ``"600r/m"``.
        burst: nginx's ``burst=`` (requests; 0 for none).
        nodelay: serve the burst at once instead of holding it to the rate.

    Use as ``with NginxLimitReq(port, "20r/s", burst=20) as nginx:``; ``nginx.url`` is
    the base URL (``http://127.0.0.1:<port>/v1``). ``nginx.errors()`` reads its error
    log (each refusal is logged there as "limiting requests").
    """

    def __init__(
        self, upstream_port: int, rate: str, *, burst: int = 0, nodelay: bool = False
    ) -> None:
        if not rate.endswith(("r/s", "r/m")):
            raise ValueError(f"rate must be like '20r/s' or '600r/m', got {rate!r}")
        if burst < 0:
            raise ValueError(f"burst must be >= 0, got {burst}")
        self.upstream_port = upstream_port
        self.rate = rate
        self.burst = burst
        self.nodelay = nodelay
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __repr__(self) -> str:
        nodelay = " nodelay" if self.nodelay else ""
        return f"NginxLimitReq(rate={self.rate}, burst={self.burst}{nodelay})"

    def start(self) -> None:
        binary = nginx_path()
        if binary is None:
            raise RuntimeError("nginx is not installed: apt-get install -y nginx")
        self._dir = tempfile.TemporaryDirectory(prefix="fanflow-nginx-")
        d = Path(self._dir.name)
        last = ""
        for _ in range(5):  # a free port may be taken before nginx binds it: try again
            self.port = _free_port()
            conf = d / "nginx.conf"
            conf.write_text(
                _CONFIG.format(
                    dir=d,
                    rate=self.rate,
                    upstream=self.upstream_port,
                    port=self.port,
                    burst=f" burst={self.burst}" if self.burst else "",
                    nodelay=" nodelay" if self.nodelay else "",
                )
            )
            self._proc = subprocess.Popen(
                [binary, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_listening(10.0):
                return
            self._stop_process()
            last = self.errors()
        self.close()
        raise RuntimeError(f"nginx did not start: {last[-2000:]}")

    def _wait_listening(self, within: float) -> bool:
        proc = self._proc
        assert proc is not None
        end = time.monotonic() + within
        while time.monotonic() < end:
            if proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)  # a real process starting: real time is the event
        return False

    def errors(self) -> str:
        """The error log so far (refusals are logged as "limiting requests")."""
        if self._dir is None:
            return ""
        log = Path(self._dir.name) / "error.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def refused(self) -> int:
        """Requests nginx refused, from its error log."""
        return self.errors().count("limiting requests")

    def _stop_process(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        self._stop_process()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> NginxLimitReq:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> NginxLimitReq:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)
