"""Start `python -m service ROLE` as a child process and learn its address (tests, benchmarks, load tests).

The service prints `LDIT_LISTENING http://host:port` (API) or `LDIT_WORKER_READY name`
(worker) on stdout once it is up; with LDIT_PORT=0 that line is the only way to learn the port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from service.settings import REPO_ROOT


@dataclass
class ServiceProcess:
    proc: subprocess.Popen
    role: str
    url: str = ""
    lines: list[str] = field(default_factory=list)  # everything it printed so far

    def wait_for(self, prefix: str, timeout: float = 90) -> str:
        end = time.time() + timeout
        while time.time() < end:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n" + "".join(self.lines[-40:]))
            time.sleep(0.05)
        self.proc.kill()
        raise TimeoutError(f"{self.role} did not print {prefix!r}:\n" + "".join(self.lines[-40:]))

    def stop(self, sig: str = "term", timeout: float = 60) -> int:
        """SIGTERM (or SIGKILL with sig="kill") and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.kill() if sig == "kill" else self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_service(role: str, env: dict[str, str], timeout: float = 300,
                  python_args: tuple[str, ...] = ()) -> ServiceProcess:
    """`python -m service ROLE` on a free loopback port, quiet logs; returns once it is listening/ready.

    `python_args` go before `-m service` (e.g. `-m cProfile -o FILE` to profile its main thread).
    """
    full_env = {**os.environ, "LDIT_PORT": "0", "LDIT_HOST": "127.0.0.1", "LDIT_LOG_LEVEL": "warning",
                "LDIT_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1", **env}
    args = [sys.executable, *python_args, "-m", "service"] + ([] if role == "all" else [role])
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    sp = ServiceProcess(proc, role)
    threading.Thread(target=lambda: [sp.lines.append(line) for line in proc.stdout], daemon=True).start()
    if role == "worker":
        sp.wait_for("LDIT_WORKER_READY", timeout)
    else:
        sp.url = sp.wait_for("LDIT_LISTENING", timeout).split()[1]
    return sp
