"""The operator CLI, installed as ``vge`` (design §7)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from libs.log import configure_logging, get_logger
from libs.settings import get_settings, nats_servers

__all__ = ["app", "main"]

app = typer.Typer(help="VoelgoedEvents operator CLI.", no_args_is_help=True, add_completion=False)
log = get_logger("vge")


@app.callback()
def _root() -> None:
    """VoelgoedEvents operator CLI."""


@app.command()
def up(
    data_dir: Annotated[Path | None, typer.Option(help="Where servers keep their data.")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 60.0,
    demo: Annotated[bool, typer.Option(help="Seed (or reuse) the demo tenant.")] = True,
) -> None:
    """Run the whole platform: servers (unless VGE_*_URL are set), all four services, and a
    demo tenant with an event, sold tickets and an enrolled gate device."""
    from libs.demo import demo_instructions, seed_demo
    from libs.launcher import SERVICES, Stack

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, service="vge")
    stack = Stack(settings, data_dir or settings.data_dir)
    stopping = threading.Event()

    def _stop(*_: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start(ready_timeout=ready_timeout)
        typer.echo(
            "\nVoelgoedEvents is up.\n"
            f"  API        http://127.0.0.1:{settings.gateway_port}  (docs: /docs)\n"
            + "".join(f"  {name:<10} {stack.health_url(name)}\n" for name in SERVICES)
            + f"  NATS       {stack.urls['nats_url']}"
            + ("" if settings.nats_url else f"  (logins: {stack.nats_passwords_file})")
            + "\n"
            f"  PostgreSQL {stack.urls['database_url']}\n"
            f"  Redis      {stack.urls['redis_url']}\n"
            "Ctrl-C stops everything.\n",
            err=True,
        )
        if demo:
            api_url = f"http://127.0.0.1:{settings.gateway_port}"
            seeded = seed_demo(stack.data_dir, api_url, stack.urls["database_url"])
            typer.echo(demo_instructions(seeded, api_url), err=True)
        while not stopping.wait(0.5):
            failed = stack.failed_service()
            if failed:
                log.error("service_exited", service=failed)
                raise typer.Exit(1)
    except (RuntimeError, TimeoutError, OSError) as exc:
        log.error("startup_failed", error=str(exc))
        raise typer.Exit(1) from exc
    finally:
        stack.stop()


@app.command("secrets")
def print_secrets() -> None:
    """Fresh secrets for a deployment, as .env lines (`vge secrets > .env` beside
    docker-compose.yml): the command-context key pair, a NATS password per user, the services'
    database role password and the cluster's route password."""
    from libs.context import generate_key_pair
    from libs.nats_auth import USERS, generate_password, password_variable

    private, public = generate_key_pair()
    typer.echo("\n".join([
        "# the gateway signs every command's context with the private key; services verify with the public",
        f"VGE_CONTEXT_PRIVATE_KEY={private}",
        f"VGE_CONTEXT_PUBLIC_KEYS={public}",
        "# one NATS login per service, and the operator's (admin): deploy/nats/auth.conf",
        *(f"{password_variable(user)}={generate_password()}" for user in USERS),
        f"VGE_DB_ROLE_PASSWORD={generate_password()}",
        "# only for the 3-node cluster (deploy/nats/nats-cluster.conf)",
        f"VGE_NATS_ROUTE_PASSWORD={generate_password()}",
    ]))  # fmt: skip


audit = typer.Typer(help="The audit log.", no_args_is_help=True)
app.add_typer(audit, name="audit")


def _stack_env(data_dir: Path) -> dict[str, str]:
    """The environment a one-off command needs: VGE_*_URL if set, else the running `vge up`."""
    import json
    import os

    env = dict(os.environ)
    stack_file = data_dir / "stack.json"
    if not env.get("VGE_DATABASE_URL") and stack_file.exists():
        stack = json.loads(stack_file.read_text())
        env.update(VGE_NATS_URL=stack["nats_url"], VGE_DATABASE_URL=stack["database_url"],
                   VGE_REDIS_URL=stack["redis_url"])
        # the stack's own NATS admits only its users: an operator command logs in as operator
        passwords_file = stack.get("nats_passwords_file")
        if passwords_file and not env.get("VGE_NATS_USER"):
            from libs.nats_auth import ADMIN

            password = json.loads(Path(passwords_file).read_text())[ADMIN]
            env.update(VGE_NATS_USER=ADMIN, VGE_NATS_PASSWORD=password)
    return env


@audit.command("verify")
def audit_verify(
    org_id: Annotated[str, typer.Argument(help="The tenant whose chain to walk.")],
    data_dir: Annotated[Path | None, typer.Option(help="Data folder of a running `vge up`.")] = None,
) -> None:
    """Walk a tenant's audit chain; print the first broken link or gap as JSON (exit 1)."""
    import subprocess

    # libs never imports a service: the audit service's own CLI runs in its own process
    env = _stack_env(data_dir or get_settings().data_dir)
    result = subprocess.run([sys.executable, "-m", "services.audit.cli", "verify", org_id], env=env)
    raise typer.Exit(result.returncode)


tenant = typer.Typer(help="Tenants (organizations).", no_args_is_help=True)
app.add_typer(tenant, name="tenant")


@tenant.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="The organization's name.")],
    data_dir: Annotated[Path | None, typer.Option(help="Data folder of a running `vge up`.")] = None,
) -> None:
    """Create a tenant with its first owner API key; prints {organization_id, api_key} as JSON."""
    import subprocess

    env = _stack_env(data_dir or get_settings().data_dir)
    result = subprocess.run([sys.executable, "-m", "services.gateway.cli", "tenant-create", name],
                            env=env)  # fmt: skip
    raise typer.Exit(result.returncode)


dlq = typer.Typer(help="Dead letters: events a consumer gave up on.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

_DataDir = Annotated[Path | None, typer.Option(help="Data folder of a running `vge up`.")]
_Consumer = Annotated[str | None, typer.Option(help="Only this consumer's (its durable name).")]


def _with_jetstream(data_dir: Path | None, work: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``work(js)`` on the NATS of ``VGE_NATS_URL`` or of the running ``vge up``."""
    import asyncio

    import nats

    from libs.nats_auth import connect_options

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format, service="vge")  # (to stderr)
    env = _stack_env(data_dir or settings.data_dir)
    if not env.get("VGE_NATS_URL"):
        typer.echo("no NATS: set VGE_NATS_URL, or start the platform with `vge up`", err=True)
        raise typer.Exit(2)

    async def run() -> None:
        nc = await nats.connect(nats_servers(env["VGE_NATS_URL"]), connect_timeout=5,
                                max_reconnect_attempts=0,
                                **connect_options(env.get("VGE_NATS_USER"), env.get("VGE_NATS_PASSWORD")))
        try:
            await work(nc.jetstream())
        finally:
            await nc.close()

    asyncio.run(run())


def _print_json(row: dict[str, Any]) -> None:
    import json

    typer.echo(json.dumps(row))


@dlq.command("list")
def dlq_list(
    consumer: _Consumer = None,
    limit: Annotated[int, typer.Option(help="At most this many, oldest first.")] = 100,
    data_dir: _DataDir = None,
) -> None:
    """Print the dead letters, one JSON object per line: seq, consumer, why, and the event."""
    from libs.dead_letters import dead_letters

    async def work(js: Any) -> None:
        shown = 0
        async for letter in dead_letters(js, consumer):
            if shown == limit:
                typer.echo("(more: list again with a larger --limit)", err=True)
                return
            _print_json(letter.summary())
            shown += 1

    _with_jetstream(data_dir, work)


@dlq.command("replay")
def dlq_replay(
    seqs: Annotated[list[int] | None, typer.Argument(help="Dead letters to replay (seq from `list`).")] = None,
    consumer: Annotated[str | None, typer.Option(help="Replay all of this consumer's.")] = None,
    data_dir: _DataDir = None,
) -> None:
    """Publish dead letters again on their original subjects (their cause fixed), and remove
    them; every consumer of the subject gets the event again and skips it if applied already."""
    from libs.dead_letters import dead_letters, replay

    if not seqs and not consumer:
        typer.echo("name the dead letters (their seq) or --consumer", err=True)
        raise typer.Exit(2)

    async def work(js: Any) -> None:
        chosen = list(seqs or []) + ([d.seq async for d in dead_letters(js, consumer)] if consumer else [])
        await _each_dead_letter(js, chosen, replay, "replayed")

    _with_jetstream(data_dir, work)


@dlq.command("discard")
def dlq_discard(
    seqs: Annotated[list[int], typer.Argument(help="Dead letters to delete for good.")],
    data_dir: _DataDir = None,
) -> None:
    """Delete dead letters that can never be applied (a malformed message, say)."""
    from libs.dead_letters import discard

    async def work(js: Any) -> None:
        await _each_dead_letter(js, seqs, discard, "discarded")

    _with_jetstream(data_dir, work)


async def _each_dead_letter(js: Any, seqs: list[int], act: Callable[[Any, int], Awaitable[Any]],
                            done: str) -> None:
    """``act`` on each dead letter, a JSON line for each as it is done; one that is not there is
    said on stderr, the others are still done, and the command then exits 1."""
    from libs.dead_letters import NoSuchDeadLetter

    missing = 0
    for seq in seqs:
        try:
            letter = await act(js, seq)
        except NoSuchDeadLetter as exc:
            typer.echo(str(exc), err=True)
            missing += 1
            continue
        _print_json({done: letter.seq, "consumer": letter.consumer, "subject": letter.subject,
                     "reason": letter.reason})
    if missing:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``vge`` command."""
    app()


if __name__ == "__main__":
    sys.exit(main())
