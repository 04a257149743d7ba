"""A service as a child process (``python -m services.<name>``): how ``vge up``, the benches and
the tests start one, wait for its health check, and stop or kill it.

One implementation, because the hard part is the same for all three: a health port picked with
:func:`libs.servers.free_port` can be taken by anything on the machine before the service binds
it a second later (the picking socket is closed by then). The service then exits, and waiting for
it must start it again on another port instead of failing, but only then: a service that exits
for any other reason fails the wait at once, with its log.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from libs.log import get_logger
from libs.servers import free_port, port_taken

__all__ = ["ServiceFailed", "ServiceProcess", "all_healthy", "stop_all"]

log = get_logger(__name__)

RESPAWNS = 3  # starts on another port after a lost one, before the wait fails


class ServiceFailed(RuntimeError):
    """A service process exited while it was awaited, or was not healthy in time."""


class ServiceProcess:
    """One service process and the port of its health check (``/healthz`` on 127.0.0.1).

    ``env`` is the child's whole environment; ``port_setting`` names the setting that gets the
    port (``VGE_GATEWAY_PORT`` for a gateway, whose API serves ``/healthz``). With no ``port``
    one is picked, and picked again if it is lost before the service binds it. ``log``: the
    child's stdout and stderr are appended there (a restart's after the first's), else they are
    this process's. ``command`` replaces ``python -m services.<service>``; ``popen`` goes to
    :class:`subprocess.Popen` as is (a session of its own, say).
    """

    def __init__(self, service: str, env: Mapping[str, str], *, port: int | None = None,
                 port_setting: str = "VGE_HEALTH_PORT", log: Path | None = None,
                 command: Sequence[str] | None = None, **popen: Any) -> None:
        self.service = service
        self.log = log
        self._env = dict(env)
        self._port_setting = port_setting
        self._port_picked = port is None
        self._command = list(command or [sys.executable, "-m", f"services.{service}"])
        self._popen = popen
        self._respawns = 0
        self.port = port if port is not None else 0
        self._spawn()

    def _spawn(self) -> None:
        if self._port_picked:
            self.port = free_port()
        env = {**self._env, self._port_setting: str(self.port)}
        self._terminated = False
        if self.log is None:
            self.proc = subprocess.Popen(self._command, env=env, **self._popen)
            return
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self._command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         **self._popen)

    @property
    def pid(self) -> int:
        """The process id of the current process (a respawn has a new one)."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, None while the process runs."""
        return self.proc.poll()

    @property
    def health_url(self) -> str:
        """Where the service answers its health check."""
        return f"http://127.0.0.1:{self.port}/healthz"

    def log_text(self) -> str:
        """The service's log so far ("" when it logs to this process's output)."""
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the service's log, for an error message."""
        return self.log_text()[-chars:]

    def _failure(self, what: str) -> ServiceFailed:
        tail = self.log_tail()
        return ServiceFailed(f"{self.service} {what}" + (f":\n{tail}" if tail else ""))

    def _still_starting(self) -> bool:
        """True while the process runs (or was started again because its picked port was taken:
        at most ``RESPAWNS`` times); raises :class:`ServiceFailed` if it exited otherwise."""
        if self.proc.poll() is None:
            return True
        if self._port_picked and self._respawns < RESPAWNS and port_taken(self.port):
            self._respawns += 1
            log.info("service_port_taken", service=self.service, port=self.port)
            self._spawn()
            return True
        raise self._failure(f"exited with {self.proc.returncode} while starting")

    async def healthy(self, timeout: float = 30.0, *, every: float = 0.1) -> None:
        """Wait for the first 200 from ``/healthz``, asking every ``every`` seconds; raises
        :class:`ServiceFailed` if the process exits for any reason but a lost port, or after
        ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient() as http:
            while loop.time() < deadline:
                self._still_starting()
                try:
                    if (await http.get(self.health_url, timeout=1)).status_code == 200:
                        log.info("service_healthy", service=self.service, health=self.health_url)
                        return
                except httpx.HTTPError:
                    await asyncio.sleep(max(every, 0.01))  # not listening yet
                    continue
                await asyncio.sleep(every)
        raise self._failure(f"not healthy within {timeout:g} s")

    async def exited(self, timeout: float = 15.0) -> int:
        """The exit code, once the process has ended on its own (a crash switch, say)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise self._failure(f"did not exit within {timeout:g} s")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no acks, nothing flushed (a crash)."""
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM, once, if the process still runs: it drains and stops (see ``libs.runtime``)."""
        if not self._terminated and self.proc.poll() is None:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    async def sigterm(self, timeout: float) -> int | None:
        """SIGTERM, then the exit code; None (and SIGKILL) if the process is still there after
        ``timeout`` (an orchestrator's grace period)."""
        self.terminate()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() > deadline:
                self.kill()
                return None
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM and wait; SIGKILL after ``grace`` seconds. Nothing if it has ended already."""
        self.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("service_killed", service=self.service, grace_seconds=grace)
            self.kill()


async def all_healthy(processes: Sequence[ServiceProcess], timeout: float = 60.0) -> None:
    """Wait until every process answers its health check, side by side; the first failure
    raises (:class:`ServiceFailed`), the others' waits are cancelled."""
    waits = [asyncio.ensure_future(p.healthy(timeout)) for p in processes]
    try:
        await asyncio.gather(*waits)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)  # (a second failure: read, not lost)


def stop_all(processes: Sequence[ServiceProcess], grace: float = 15.0) -> None:
    """SIGTERM every process at once, then wait for each; SIGKILL the ones still running
    ``grace`` seconds after the SIGTERMs (one grace period for all, not one each)."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.stop(max(0.1, deadline - time.monotonic()))
