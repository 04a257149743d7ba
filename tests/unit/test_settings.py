"""The settings' own parsing."""

import pytest

from libs.settings import nats_servers


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("nats://127.0.0.1:4222", ["nats://127.0.0.1:4222"]),
        ("nats://nats-1:4222, nats://nats-2:4222,nats://nats-3:4222,",
         ["nats://nats-1:4222", "nats://nats-2:4222", "nats://nats-3:4222"]),
    ],
)
def test_a_nats_url_names_one_server_or_a_clusters_servers(url: str, servers: list[str]):
    assert nats_servers(url) == servers
