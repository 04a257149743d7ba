"""``vge up``: the whole platform on one machine.

Starts NATS, PostgreSQL and Redis (or uses the configured ``VGE_*_URL`` servers), then the four
services as child processes, waits until each answers its health check, and on Ctrl-C or
SIGTERM stops the services (SIGTERM, then SIGKILL after a grace period) and then the servers.

A NATS started here runs with one user per service and the subject permissions of
``libs.nats_auth``; each service process logs in as itself. A configured ``VGE_NATS_URL`` is used
as it is: the services then log in with ``VGE_NATS_USER``/``VGE_NATS_PASSWORD`` if set.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.context import generate_key_pair
from libs.log import get_logger
from libs.nats_auth import generate_passwords
from libs.servers import resolve_server_urls
from libs.service_process import ServiceProcess, all_healthy, stop_all
from libs.settings import Settings

__all__ = ["Stack", "SERVICES", "STACK_FILE", "NATS_PASSWORDS_FILE"]

log = get_logger(__name__)

SERVICES = ("scanning", "payments", "audit", "gateway")
STACK_FILE = "stack.json"
NATS_PASSWORDS_FILE = "nats-passwords.json"


def _die_with_parent() -> None:
    # Linux: SIGTERM the service if the launcher itself is killed, so nothing is orphaned.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the launcher's own stop() still applies
        pass


@dataclass
class Stack:
    """The running platform: servers, keys and service processes."""

    settings: Settings
    data_dir: Path
    urls: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    _servers: Any = None
    _keys: tuple[str, str] | None = None
    _nats_passwords: dict[str, str] | None = None

    def start(self, *, ready_timeout: float = 60.0) -> None:
        """Servers first, then the services; returns when every service is healthy."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # an operator's NATS has its own users: render none and pass the operator's login on
        self._nats_passwords = None if self.settings.nats_url else self._load_nats_passwords()
        self.urls, self._servers = resolve_server_urls(
            self.settings,
            self.data_dir / "servers",
            allow_docker=False,
            nats_passwords=self._nats_passwords,
        )
        log.info("servers_ready", **self.urls)
        self._keys = self._context_keys()
        env = self._child_env()
        for name in SERVICES:
            child_env = dict(env)
            if self._nats_passwords is not None:
                child_env.update(VGE_NATS_USER=name, VGE_NATS_PASSWORD=self._nats_passwords[name])
            # the gateway's port is the configured one; the others' are picked (and picked again
            # if one is taken before its service binds it, see ``ServiceProcess``)
            self.processes[name] = ServiceProcess(
                name, child_env, port=self.settings.gateway_port if name == "gateway" else None,
                # own session: Ctrl-C reaches only the launcher, which stops things in order
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        asyncio.run(all_healthy(list(self.processes.values()), ready_timeout))
        self._write_stack_file()

    @property
    def ports(self) -> dict[str, int]:
        """Each service's health port."""
        return {name: p.port for name, p in self.processes.items()}

    def _context_keys(self) -> tuple[str, str]:
        s = self.settings
        if s.context_private_key and s.context_public_keys:
            return s.context_private_key, s.context_public_keys
        # local runs: one dev key pair, kept in the data folder so restarts agree
        key_file = self.data_dir / "dev-context-key.json"
        if key_file.exists():
            keys = json.loads(key_file.read_text())
            return keys["private"], keys["public"]
        private, public = generate_key_pair()
        key_file.write_text(json.dumps({"private": private, "public": public}))
        key_file.chmod(0o600)
        return private, public

    @property
    def nats_passwords_file(self) -> Path:
        """The NATS users' passwords of a locally started NATS (operator user: ``admin``)."""
        return self.data_dir / NATS_PASSWORDS_FILE

    def _load_nats_passwords(self) -> dict[str, str]:
        # generated once, kept like the context key: a restart reuses the JetStream data and
        # keeps the same logins; a user added since gets a password of its own
        path = self.nats_passwords_file
        stored = json.loads(path.read_text()) if path.exists() else {}
        passwords = {user: stored.get(user) or fresh for user, fresh in generate_passwords().items()}
        if passwords != stored:
            # created readable by its owner only (not chmod'ed after the passwords are in it)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(passwords, indent=2))
        path.chmod(0o600)
        return passwords

    def _child_env(self) -> dict[str, str]:
        assert self._keys is not None
        env = dict(os.environ)
        env.update(
            VGE_NATS_URL=self.urls["nats_url"],
            VGE_DATABASE_URL=self.urls["database_url"],
            VGE_REDIS_URL=self.urls["redis_url"],
            VGE_CONTEXT_PRIVATE_KEY=self._keys[0],
            VGE_CONTEXT_PUBLIC_KEYS=self._keys[1],
            VGE_GATEWAY_PORT=str(self.settings.gateway_port),
        )
        return env

    def health_url(self, name: str) -> str:
        """Where a service answers ``/healthz``."""
        return self.processes[name].health_url

    def _write_stack_file(self) -> None:
        stack = {
            **self.urls,
            "gateway_url": f"http://127.0.0.1:{self.settings.gateway_port}",
            "health": {name: self.health_url(name) for name in SERVICES},
            "pids": {name: p.pid for name, p in self.processes.items()},
            "server_pids": [
                srv.pid for srv in getattr(self._servers, "servers", []) if srv.pid is not None
            ],
            # where one-off commands find the operator login of this stack's NATS
            "nats_passwords_file": (
                str(self.nats_passwords_file) if self._nats_passwords is not None else None
            ),
        }
        (self.data_dir / STACK_FILE).write_text(json.dumps(stack, indent=2))

    def failed_service(self) -> str | None:
        """The first service that exited on its own, if any."""
        for name, proc in self.processes.items():
            if proc.returncode is not None:
                return name
        return None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service, SIGKILL the ones still running after ``grace``; then servers."""
        stop_all(list(self.processes.values()), grace)
        (self.data_dir / STACK_FILE).unlink(missing_ok=True)
        if self._servers is not None:
            self._servers.stop()
        log.info("stack_stopped")
