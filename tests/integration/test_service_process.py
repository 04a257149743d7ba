"""``libs.service_process``: how ``vge up``, the benches and the tests start a service process."""

from __future__ import annotations

import socket

import pytest

import libs.service_process
from libs.servers import free_port
from libs.service_process import ServiceFailed


async def test_a_service_whose_picked_port_was_taken_before_it_bound_it_is_started_on_another(
        service_process, monkeypatch):
    # the port is picked, and the service binds it a second later: in between, anything on the
    # machine may take it (here: this socket)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([taken.getsockname()[1]])
    monkeypatch.setattr(libs.service_process, "free_port", lambda: next(picks, None) or free_port())
    try:
        audit = service_process("audit", VGE_LOG_LEVEL="WARNING")
        first_pid = audit.pid
        await audit.healthy()
        assert audit.port != taken.getsockname()[1]
        assert audit.pid != first_pid and audit.returncode is None
    finally:
        taken.close()


async def test_a_service_that_exits_for_another_reason_fails_the_wait_at_once_with_its_log(service_process):
    audit = service_process("audit", VGE_CONTEXT_PUBLIC_KEYS="not-a-key")
    first_pid = audit.pid
    with pytest.raises(ServiceFailed) as failed:
        await audit.healthy(timeout=60)
    message = str(failed.value)
    assert message.startswith("audit exited with"), message[:300]  # not the wait's time-out
    assert audit.pid == first_pid  # not started again: its port was not the reason
    assert "context public key is not valid base64" in message  # its log says why
