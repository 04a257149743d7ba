"""The launcher behind ``vge up``, on the session's servers."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

import libs.service_process
from libs.launcher import SERVICES, Stack
from libs.servers import free_port
from libs.settings import Settings


def test_a_service_whose_health_port_was_taken_before_it_bound_it_is_started_on_another(
        server_urls, tmp_path: Path, monkeypatch):
    # the launcher picks a free port and the service binds it a second later: in between,
    # anything on the machine may take it (here: this socket, for the first service started)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([taken.getsockname()[1]])
    monkeypatch.setattr(libs.service_process, "free_port", lambda: next(picks, None) or free_port())
    settings = Settings(nats_url=server_urls["nats_url"], database_url=server_urls["database_url"],
                        redis_url=server_urls["redis_url"], gateway_port=free_port())
    stack = Stack(settings, tmp_path / "stack")
    try:
        stack.start(ready_timeout=60)
        assert stack.ports[SERVICES[0]] != taken.getsockname()[1]
        for name in SERVICES:
            assert httpx.get(stack.health_url(name), timeout=2).status_code == 200
    finally:
        stack.stop()
        taken.close()
