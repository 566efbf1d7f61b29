"""The worker processes of ``fanflow.local()``: both ends of their protocol.

Each worker is a fresh Python interpreter (``subprocess``, never ``fork``) that loads one
model instance (``_llama.Instance``) and runs one generation at a time, streaming each
token back as it is generated. The user's process never runs llama.cpp code for
generation, so a native crash (SIGSEGV, abort, the OOM killer) ends only the worker:
the user's side sees the connection close, reads the exit status and raises
:class:`WorkerDied` (docs/decisions/0081).

A worker starts from a three-line bootstrap (:data:`BOOT`) that takes ``sys.path`` from
its parent and imports only fanflow (never the caller's ``__main__``, as
``multiprocessing``'s spawn would). The two ends talk over a socket pair with
``multiprocessing.connection.Connection`` (pickled messages):

    user's process                         worker
    sys.path, then Settings      ->
                                 <-        ("ready", WorkerInfo) | ("load_failed", message)
    ("job", id, Request)         ->
    ("cancel", id)               ->        (any time; the worker stops before its next token)
                                 <-        ("token", token_id) ... then
                                 <-        ("done", id, Response) | ("error", id, FanflowError)
    None                         ->        (exit)

A worker exits when its connection closes or its parent process is gone (it checks
``os.getppid()`` twice a second), so killing the user's process leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import Any

from .._exceptions import ConfigError, FanflowError, ServerError
from .._types import Request, Response
from ._llama import Instance, Settings

__all__ = ["BOOT", "Worker", "WorkerDied", "WorkerInfo", "serve"]

# What a worker runs: take the parent's import path, then serve on the inherited socket.
BOOT = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    "from fanflow.providers._worker import serve\n"
    "serve(conn, int(sys.argv[2]))\n"
)
# How often an idle worker checks that its parent still lives, in seconds.
PARENT_CHECK = 0.5
# How long a worker may take to load its model before it is given up on, in seconds.
LOAD_TIMEOUT = 300.0
# How long a worker asked to exit may take before it is killed, in seconds.
EXIT_GRACE = 2.0
# How much of a dead worker's stderr its error quotes, in characters.
STDERR_TAIL = 300


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker reports once its model is loaded."""

    pid: int
    n_ctx: int
    name: str
    buffers: tuple[str, ...]


class WorkerDied(Exception):
    """A worker process ended unasked. ``how`` says how (``"signal 11"``).

    Attributes:
        how: the exit status in words: ``"signal 11"``, ``"exit code 1"``.
        detail: an explanation of the signal and the end of the worker's stderr, if any.
        loaded: whether the worker had finished loading its model.
        calls: calls the worker had completed.
    """

    def __init__(self, how: str, detail: str, *, loaded: bool, calls: int) -> None:
        super().__init__(how)
        self.how = how
        self.detail = detail
        self.loaded = loaded
        self.calls = calls


class Worker:
    """One worker process, seen from the user's process.

    One thread at a time drives it (:meth:`wait_ready`, :meth:`run`); :meth:`cancel`
    may be called from any thread.
    """

    def __init__(self, settings: Settings) -> None:
        ours, theirs = Pipe(duplex=True)
        # The worker's stderr, quoted when it dies; closed in stop() or _died().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )
        except BaseException:
            ours.close()
            self._stderr.close()
            raise
        finally:
            theirs.close()
        self.pid = self.process.pid
        self.settings = settings
        self._conn = ours
        self._send_lock = threading.Lock()
        self.info: WorkerInfo | None = None
        self.calls = 0
        self.dead = False
        self.killed = False  # by us, as hung
        # If the worker is already gone, wait_ready() finds out and says how it ended.
        with contextlib.suppress(OSError):
            self._send(list(sys.path))
            self._send(settings)

    def __repr__(self) -> str:
        return f"<fanflow local worker pid={self.pid}>"

    # -- driving it (one thread) ----------------------------------------------------

    def wait_ready(self, give_up: Callable[[], bool]) -> bool:
        """Wait until the model is loaded; False if ``give_up()`` said so first.

        Raises:
            WorkerDied: the worker ended while loading.
            ConfigError: llama.cpp could not load the model, or loading took too long.
        """
        waited = 0.0
        step = 0.05
        while self.info is None:
            if not self._poll(step):
                if give_up():
                    return False
                waited += step
                if waited >= LOAD_TIMEOUT:
                    self.stop()
                    raise ConfigError(
                        f"the local model's worker took more than {LOAD_TIMEOUT:g} s to load "
                        f"{self.settings.path}; check the file and the free memory"
                    )
                continue
            message = self._recv()
            if message[0] == "ready":
                self.info = message[1]
            elif message[0] == "load_failed":
                self.stop()
                raise ConfigError(message[1])
        return True

    def run(self, job: int, request: Request, on_token: Callable[[int], None]) -> Response:
        """Generate a reply to ``request`` as job number ``job``; ``on_token`` is called
        for each token as it arrives.

        Raises:
            WorkerDied: the worker ended during the call.
            FanflowError: the call failed in the worker (a too-long prompt, ...).
        """
        if request.metadata:  # the model never reads it, and it need not pickle
            request = request.with_options(metadata={})
        self._send(("job", job, request))
        while True:
            message = self._recv()
            kind = message[0]
            if kind == "token":
                on_token(message[1])
            elif kind == "done":
                self.calls += 1
                response: Response = message[2]
                return response
            elif kind == "error":
                error: FanflowError = message[2]
                raise error

    # -- from any thread ------------------------------------------------------------

    def cancel(self, job: int) -> None:
        """Ask the worker to stop job ``job`` before its next token (no-op if it is done)."""
        with contextlib.suppress(OSError):
            self._send(("cancel", job))

    def kill(self) -> None:
        """Kill the worker (SIGKILL): it is hung. The thread driving it then sees it die."""
        self.killed = True
        with contextlib.suppress(OSError):
            self.process.kill()

    def stop(self, grace: float = EXIT_GRACE) -> None:
        """Ask the worker to exit; kill it if it has not within ``grace`` seconds. Reaps
        the process. Safe to call twice."""
        self.dead = True
        with contextlib.suppress(OSError):
            self._send(None)
        self._conn.close()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()

    # -- plumbing -------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _poll(self, timeout: float) -> bool:
        try:
            return self._conn.poll(timeout)
        except (OSError, EOFError):
            return True  # the next _recv says what happened

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _died(self) -> WorkerDied:
        """The worker's connection closed unasked: reap it and say how it ended."""
        self.dead = True
        self._conn.close()
        try:
            code = self.process.wait(10.0)
        except subprocess.TimeoutExpired:  # it closed the socket but lives on: end it
            self.process.kill()
            code = self.process.wait()
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", errors="replace").strip()[-STDERR_TAIL:]
        self._stderr.close()
        how, detail = describe_exit(code)
        if tail:
            detail += (
                ("; " if detail else "") + "its last output: " + " | ".join(tail.splitlines()[-3:])
            )
        return WorkerDied(how, detail, loaded=self.info is not None, calls=self.calls)


def describe_exit(code: int) -> tuple[str, str]:
    """An exit status in words, and what it usually means."""
    if code >= 0:
        return f"exit code {code}", ""
    number = -code
    try:
        sig = signal.Signals(number)
    except ValueError:
        return f"signal {number}", ""
    meaning = _SIGNAL_MEANINGS.get(sig)
    return f"signal {number}", f"{sig.name}: {meaning}" if meaning else sig.name


_SIGNAL_MEANINGS = {
    signal.SIGSEGV: "a crash in native code (llama.cpp)",
    signal.SIGABRT: "llama.cpp aborted (a failed assertion)",
    signal.SIGBUS: "a crash in native code (llama.cpp), or the model file changed",
    signal.SIGILL: "llama.cpp used an instruction this CPU lacks",
    signal.SIGKILL: "killed, by the kernel's out-of-memory killer or by someone",
}


# ----------------------------------------------------------------- the worker's side


def serve(conn: Connection, parent: int) -> None:
    """Run in a worker process: load the model, then serve jobs until told to exit, the
    connection closes, or the parent process is gone."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides what
    # stops, and a worker stops when the parent says or goes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource  # a native crash must not leave a core file of the whole model

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    settings: Settings = conn.recv()
    jobs: queue.SimpleQueue[tuple[str, int, Request] | None] = queue.SimpleQueue()
    cancelled = [0]  # the id of the job to stop; written by the reader, read by generation
    threading.Thread(
        target=_read, args=(conn, parent, jobs, cancelled), name="fanflow-reader", daemon=True
    ).start()

    def send(message: Any) -> None:
        try:
            conn.send(message)
        except OSError:  # the parent is gone
            os._exit(0)

    try:
        instance = Instance(settings)
    except ConfigError as exc:
        send(("load_failed", str(exc)))
        return
    send(("ready", WorkerInfo(os.getpid(), instance.n_ctx, instance.name, instance.buffers)))
    while (job := jobs.get()) is not None:
        send(_generate(instance, job[1], job[2], cancelled, send))
    instance.close()


def _generate(
    instance: Instance,
    number: int,
    request: Request,
    cancelled: list[int],
    send: Callable[[Any], None],
) -> tuple[str, int, Any]:
    """Run job ``number``, streaming its tokens; the message that ends it."""
    try:
        response = instance.generate(
            request,
            should_stop=lambda: cancelled[0] == number,
            on_token=lambda token: send(("token", token)),
        )
    except FanflowError as exc:
        return ("error", number, exc)
    except Exception as exc:
        failure = ServerError(f"the local model failed: {type(exc).__name__}: {exc}")
        return ("error", number, failure)
    return ("done", number, response)


def _read(
    conn: Connection,
    parent: int,
    jobs: queue.SimpleQueue[tuple[str, int, Request] | None],
    cancelled: list[int],
) -> None:
    """The worker's reader thread: queue jobs, note cancellations, exit with the parent."""
    while True:
        try:
            if not conn.poll(PARENT_CHECK):
                if os.getppid() != parent:
                    os._exit(0)
                continue
            message = conn.recv()
        except (EOFError, OSError):  # the parent closed the connection or died
            os._exit(0)
        if message is None:
            jobs.put(None)
            return
        if message[0] == "cancel":
            cancelled[0] = message[1]
        else:
            jobs.put(message)
