"""Services on a 3-node NATS cluster (deploy/nats/nats-cluster.conf): the event streams are kept
on three servers when the services say so (``VGE_STREAM_REPLICAS``), so losing one loses no
event, and a single server refuses more than one replica instead of running with less than
asked; a service given the cluster's servers (``VGE_NATS_URL``, comma-separated) starts while
any one of them answers."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from libs.jetstream import ensure_streams
from libs.nats_auth import ADMIN, USERS, connect_options, generate_passwords, password_variable
from libs.servers import _nats_binary, free_port
from libs.subjects import DEAD_LETTER_STREAM, EVENTS_STREAM
from services.audit.bootstrap import DURABLE as AUDIT_DURABLE

STREAMS = (EVENTS_STREAM, DEAD_LETTER_STREAM)
DEPLOY = Path(__file__).parents[2] / "deploy" / "nats"


async def _replicated(js: JetStreamContext, stream: str, eventually: Any, replicas: int) -> None:
    async def in_step() -> bool:
        info = await js.stream_info(stream)
        peers = (info.cluster and info.cluster.replicas) or []
        return info.config.num_replicas == replicas and len(peers) == replicas - 1 and all(
            p.current for p in peers)

    await eventually(in_step, what=f"{stream} on {replicas} servers, all in step")


async def test_a_service_keeps_the_streams_on_three_servers_and_losing_one_loses_no_event(
    nats_cluster, service_process, eventually
):
    audit = service_process("audit", VGE_NATS_URL=nats_cluster.nodes[0].url, VGE_STREAM_REPLICAS="3")
    await audit.healthy()
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=nats_cluster.JS_TIMEOUT)
        for stream in STREAMS:
            await _replicated(js, stream, eventually, 3)
        subject = "vge.evt.replica-probe.payments.ticket.issued"
        await js.publish(subject, b"before", headers={"Nats-Msg-Id": "replica-probe-1"})

        stopped = await nats_cluster.leader(js, EVENTS_STREAM)
        stopped.stop()
        # the two left elect a new leader; a publish is acknowledged once both have it
        ack = None
        for _ in range(100):
            try:
                ack = await js.publish(subject, b"after", headers={"Nats-Msg-Id": "replica-probe-2"},
                                       timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
                    nats.js.errors.ServiceUnavailableError):
                continue
        assert ack is not None, "no leader after losing one of three servers"
        assert (await nats_cluster.leader(js, EVENTS_STREAM)) is not stopped
        last = await js.get_last_msg(EVENTS_STREAM, subject)
        assert last.data == b"after"
        # written while the lost server led: kept by the others
        first = await js.get_msg(EVENTS_STREAM, seq=1, subject=subject, next=True)
        assert first.data == b"before" and first.seq < ack.seq
    finally:
        await nc.close()


async def test_a_service_raises_a_single_server_stream_to_three_and_never_lowers_it(nats_cluster, eventually):
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=nats_cluster.JS_TIMEOUT)
        await ensure_streams(js)  # as deployed before the setting existed: one replica
        assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 1
        # with the audit log's consumer on it, as a running deployment has
        await js.add_consumer(EVENTS_STREAM, ConsumerConfig(
            durable_name=AUDIT_DURABLE, filter_subject="vge.evt.>", ack_policy=AckPolicy.EXPLICIT))

        await ensure_streams(js, replicas=3)
        for stream in STREAMS:
            await _replicated(js, stream, eventually, 3)

        async def consumer_on_three() -> bool:  # (the consumer follows its stream)
            info = await js.consumer_info(EVENTS_STREAM, AUDIT_DURABLE)
            peers = (info.cluster and info.cluster.replicas) or []
            return len(peers) == 2 and all(p.current for p in peers)

        await eventually(consumer_on_three, what="the audit consumer on three servers")

        # a replica still on the old setting (a rolling deploy) starts: the streams stay on three
        await ensure_streams(js, replicas=1)
        for stream in STREAMS:
            assert (await js.stream_info(stream)).config.num_replicas == 3
    finally:
        await nc.close()


async def test_a_service_asking_a_single_server_for_three_replicas_does_not_start(service_process, nats_url):
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)  # the session's streams, as another service made them
        audit = service_process("audit", VGE_STREAM_REPLICAS="3")
        assert await audit.exited() != 0
        assert "replicas > 1 not supported in non-clustered mode" in audit.log_text()
        # and they were left as they were
        assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 1
    finally:
        await nc.close()


async def test_a_service_given_the_clusters_servers_starts_while_the_first_is_down(
    nats_cluster, service_process, eventually
):
    nats_cluster.nodes[0].stop()
    audit = service_process("audit", **nats_cluster.service_env)
    await audit.healthy()
    nc = await nats_cluster.connect()
    try:  # it reached the cluster through the others: its streams and its consumer are there
        js = nc.jetstream(timeout=nats_cluster.JS_TIMEOUT)
        for stream in STREAMS:
            assert (await js.stream_info(stream)).config.num_replicas == 3
        assert (await js.consumer_info(EVENTS_STREAM, "audit")).config.durable_name == "audit"
    finally:
        await nc.close()


async def test_the_deploy_cluster_config_forms_a_cluster_the_services_run_on(
    tmp_path, service_process, eventually
):
    # deploy/nats/nats-cluster.conf itself, three nodes on this machine: the routes log in with
    # the route password, the users and permissions are auth.conf's, and a service on its own
    # user keeps the streams on three nodes. Only what must differ on one machine differs: the
    # ports (on the command line) and the storage folder.
    passwords = generate_passwords()
    route_ports = [free_port() for _ in range(3)]
    client_ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats-route://route:route-secret@127.0.0.1:{p}" for p in route_ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    env.update({password_variable(user): passwords[user] for user in USERS},
               VGE_NATS_ROUTE_PASSWORD="route-secret", VGE_NATS_ROUTES=f"[{routes}]")
    nodes = []
    try:
        for i in range(3):
            folder = tmp_path / f"nats-{i + 1}"
            folder.mkdir()
            # the files as deployed, but for the storage folder (nats-server takes no -sd beside
            # a store_dir in the file)
            conf = (DEPLOY / "nats-cluster.conf").read_text()
            assert conf.count("store_dir: /data/jetstream") == 1
            (folder / "nats-cluster.conf").write_text(
                conf.replace("store_dir: /data/jetstream", f"store_dir: {folder / 'jetstream'}"))
            shutil.copy(DEPLOY / "auth.conf", folder)
            nodes.append(subprocess.Popen(
                [_nats_binary(), "-c", str(folder / "nats-cluster.conf"), "-a", "127.0.0.1",
                 "-p", str(client_ports[i]), "-m", str(free_port()),
                 "--cluster", f"nats://127.0.0.1:{route_ports[i]}"],
                env={**env, "VGE_NATS_SERVER_NAME": f"nats-{i + 1}"},
                stdout=(folder / "nats.log").open("w"), stderr=subprocess.STDOUT,
            ))
        servers = [f"nats://127.0.0.1:{p}" for p in client_ports]
        admin = await _logged_in(servers, ADMIN, passwords[ADMIN])
        try:
            # JetStream answers once the nodes found each other through the authenticated routes
            async with asyncio.timeout(30):
                while True:
                    try:
                        await admin.jetstream().account_info()
                        break
                    except (nats.errors.Error, nats.js.errors.Error):
                        await asyncio.sleep(0.2)

            scanning = service_process("scanning", VGE_NATS_URL=",".join(servers), VGE_STREAM_REPLICAS="3",
                                       VGE_NATS_USER="scanning", VGE_NATS_PASSWORD=passwords["scanning"])
            await scanning.healthy()
            js = admin.jetstream(timeout=15)
            for stream in STREAMS:
                await _replicated(js, stream, eventually, 3)
                info = await js.stream_info(stream)
                assert {info.cluster.leader, *(p.name for p in info.cluster.replicas)} == {
                    "nats-1", "nats-2", "nats-3"}
        finally:
            await admin.close()
    finally:
        for node in nodes:
            node.kill()
            node.wait()


async def _logged_in(servers: list[str], user: str, password: str) -> nats.NATS:
    async with asyncio.timeout(30):
        while True:
            try:
                return await nats.connect(servers=servers, connect_timeout=1, allow_reconnect=False,
                                          **connect_options(user, password))
            except (OSError, nats.errors.Error):
                await asyncio.sleep(0.2)
