"""Start a job's ranks on this host with torchrun (torch.distributed.run, the elastic agent), and stop them.

One torchrun per host and attempt, as a child process of the task: ``--nproc-per-node`` ranks of
``python -m worker.rank``, joined to the other hosts through a c10d rendezvous, ``--max-restarts
0`` (a failed rank ends the attempt for every rank; the job's own retry resumes from its last
checkpoint, under the job's attempt cap, instead of torchrun restarting it in place).

Nothing outlives the task: torchrun is exec'd from a small guard that asks the kernel to SIGKILL
it when the task process dies (PR_SET_PDEATHSIG), and every rank does the same with torchrun as
its parent (`worker.rank`). Otherwise a worker killed mid-job would leave ranks writing to a row
that another worker has already taken over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from kdiga_service.settings import Settings

log = logging.getLogger(__name__)

RANK_JOB_ENV = "KDIGA_RANK_JOB"  # set in every rank's environment: the job id (for operators and tests)
STOP_GRACE_S = 20.0  # torchrun's SIGTERM → SIGKILL of its ranks, then ours of torchrun
# exec torchrun in this process after asking for SIGKILL when the parent (the task) dies
_GUARD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(70)  # the parent died before prctl\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[2:]])\n"
)


@dataclass(frozen=True)
class Rendezvous:
    """How this host's torchrun meets the others: the rendezvous id (one per attempt), the c10d
    store's host:port, whether this host serves it, and the address this host is reached at."""

    id: str
    endpoint: str
    is_host: bool
    local_addr: str
    nodes: int
    devices_per_node: int
    join_timeout_s: float


def advertised_host(s: Settings) -> str:
    """The address other hosts reach this worker at (KDIGA_RENDEZVOUS_HOST, else its name's address)."""
    if s.rendezvous_host:
        return s.rendezvous_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()


def free_port(host: str = "") -> int:
    """A port nobody listens on now (the rendezvous binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def command(rdzv: Rendezvous, launch_file: Path) -> list[str]:
    """The guard + torchrun command line for this host."""
    conf = f"is_host={int(rdzv.is_host)},join_timeout={int(rdzv.join_timeout_s)}"
    return [
        sys.executable, "-c", _GUARD, str(os.getpid()),
        f"--nnodes={rdzv.nodes}", f"--nproc-per-node={rdzv.devices_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv.endpoint}", f"--rdzv-id={rdzv.id}",
        f"--rdzv-conf={conf}", f"--local-addr={rdzv.local_addr}", "--max-restarts=0",
        "--monitor-interval=0.5", f"--shutdown-timeout={int(STOP_GRACE_S)}",
        "-m", "worker.rank", str(launch_file),
    ]


def settings_env(s: Settings) -> dict[str, str]:
    """`s` as KDIGA_* variables, so the ranks read the settings this task runs with."""
    env = {}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"KDIGA_{name.upper()}"] = str(value)
    return env


def rank_env(s: Settings, job_id: str, devices_per_node: int) -> dict[str, str]:
    """The environment of torchrun and its ranks."""
    env = {**os.environ, **settings_env(s), RANK_JOB_ENV: job_id}
    # torchrun would set 1 thread per rank; on a CPU worker the ranks share the host's cores instead
    cores = len(os.sched_getaffinity(0))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, devices_per_node))))
    return env


class Launch:
    """One torchrun process and its log; `wait` returns its exit code, `stop` ends it and its ranks."""

    def __init__(self, rdzv: Rendezvous, launch_file: Path, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(command(rdzv, launch_file), env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("torchrun started", extra={"pid": self.proc.pid, "rendezvous": rdzv.id, "endpoint": rdzv.endpoint,
                                            "nodes": rdzv.nodes, "devices_per_node": rdzv.devices_per_node})

    def wait(self, keep_going: Callable[[], bool], poll_s: float = 0.5) -> int:
        """Wait for torchrun to exit; stop it as soon as `keep_going()` says False."""
        try:
            while (code := self.proc.poll()) is None:
                if not keep_going():
                    log.warning("stopping the job's ranks", extra={"pid": self.proc.pid})
                    return self.stop()
                time.sleep(poll_s)
            return code
        except BaseException:  # a soft time limit, a warm shutdown: the ranks go with the task
            self.stop()
            raise

    def stop(self) -> int:
        """SIGTERM torchrun (it stops its ranks), SIGKILL it if it lingers; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the ranks follow it (PR_SET_PDEATHSIG)
        return self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
