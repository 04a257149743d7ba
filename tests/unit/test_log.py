"""The one logger setup: every line written while a message is handled carries its correlation id."""

from __future__ import annotations

import asyncio
import json
from typing import Callable
from uuid import UUID

import pytest
import structlog

from libs.log import _BOUND, bound_correlation, configure_logging, get_logger


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str]):
    """Log as JSON to the captured stderr for the test (the test calls it first: pytest swaps
    stderr between setup and the test), then back to the suite's setup: the same objects, since
    loggers cached before hold on to its processor list (and ``capture_logs`` edits that list)."""
    saved, bound = structlog.get_config(), _BOUND.get()

    def start() -> Callable[[], list[dict]]:
        configure_logging("INFO", "json", service="scanning")
        return lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines()]

    yield start
    structlog.configure(**saved)
    _BOUND.set(bound)


def test_a_line_carries_the_bound_fields_inside_the_block_and_not_after(json_lines) -> None:
    lines = json_lines()
    log = get_logger("test")
    with bound_correlation("corr-1", subject="vge.cmd.scanning.scan"):
        log.info("inside", gate="north")
        with bound_correlation("corr-2", actor="device-7", org_id=UUID(int=7)):
            log.info("nested")
        log.info("back")
    log.info("after")
    inside, nested, back, after = lines()
    assert inside["correlation_id"] == "corr-1" and inside["subject"] == "vge.cmd.scanning.scan"
    assert inside["gate"] == "north" and inside["service"] == "scanning"
    # the inner block adds its fields and names its own correlation id; the outer ones stay
    assert nested["correlation_id"] == "corr-2" and nested["actor"] == "device-7"
    assert nested["subject"] == "vge.cmd.scanning.scan" and nested["org_id"] == str(UUID(int=7))
    assert back["correlation_id"] == "corr-1" and "actor" not in back
    assert "correlation_id" not in after and "subject" not in after and after["service"] == "scanning"


def test_a_field_of_the_call_wins_and_tasks_keep_their_own_message(json_lines) -> None:
    lines = json_lines()
    log = get_logger("test")

    async def handle(correlation_id: str, started: asyncio.Event, go: asyncio.Event) -> None:
        with bound_correlation(correlation_id):
            started.set()
            await go.wait()  # the other message's block opens and closes meanwhile
            log.info("handled")

    async def main() -> None:
        go = asyncio.Event()
        first, second = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(handle("a", first, go)), asyncio.create_task(handle("b", second, go))]
        await first.wait()
        await second.wait()
        go.set()
        await asyncio.gather(*tasks)
        with bound_correlation("c"):
            log.info("explicit", correlation_id="given")

    asyncio.run(main())
    written = lines()
    assert sorted(line["correlation_id"] for line in written if line["event"] == "handled") == ["a", "b"]
    assert [line["correlation_id"] for line in written if line["event"] == "explicit"] == ["given"]
