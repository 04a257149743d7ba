"""The socket a service's HTTP server (health, metrics, the gateway's API) listens on
(``libs.servers.bind_port``, bound by ``libs.runtime``)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from libs.servers import bind_port, port_taken


async def test_connections_accepted_on_it_send_without_waiting_for_nagle():
    # asyncio sets TCP_NODELAY only on connections whose socket names IPPROTO_TCP; an accepted
    # one copies the listening socket's. Without it a response waited for the delayed ACK.
    sock = bind_port(0, "127.0.0.1")
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        nodelay.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        assert await asyncio.wait_for(nodelay, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_a_taken_port_is_an_error_at_once():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            bind_port(taken.getsockname()[1], "127.0.0.1")
        assert port_taken(taken.getsockname()[1])
    finally:
        taken.close()
