"""A stream's placement refused because too few servers are online (``NO_PLACEMENT``: a NATS
cluster still forming reports its nodes online one by one) is asked again for a while; a
stream that exists is then kept as it is rather than stopping the service's start.

JetStream is faked here: a real cluster gives this answer only in the moment it forms (seen
once in CI, raising a stream to three replicas right after the cluster started), which no test
can bring about on purpose. The real raise is tested in tests/integration/test_nats_cluster.py."""

from __future__ import annotations

from types import SimpleNamespace

import nats.errors
import nats.js.errors
import pytest

from libs.jetstream import NO_PLACEMENT, STREAM_EXISTS_WITH_OTHER_SETTINGS, ensure_streams


def _refused(code: int) -> nats.js.errors.BadRequestError:
    return nats.js.errors.BadRequestError(code=400, err_code=code, description=f"refused ({code})")


class JetStream:
    """Answers ``add_stream`` and ``update_stream`` with the errors queued for them, then OK."""

    def __init__(self, *, add: list[int], update: list[int], replicas: int = 1) -> None:
        self.add, self.update, self.replicas = add, update, replicas
        self.calls: list[tuple[str, str, int]] = []

    async def add_stream(self, cfg) -> None:
        self.calls.append(("add", cfg.name, cfg.num_replicas))
        if self.add:
            raise _refused(self.add.pop(0))

    async def update_stream(self, cfg) -> None:
        self.calls.append(("update", cfg.name, cfg.num_replicas))
        if self.update:
            raise _refused(self.update.pop(0))

    async def stream_info(self, name):
        return SimpleNamespace(config=SimpleNamespace(num_replicas=self.replicas))


async def test_a_raise_refused_while_the_cluster_forms_is_asked_again():
    js = JetStream(add=[STREAM_EXISTS_WITH_OTHER_SETTINGS, STREAM_EXISTS_WITH_OTHER_SETTINGS],
                   update=[NO_PLACEMENT, NO_PLACEMENT])
    await ensure_streams(js, replicas=3, placement_wait=5)
    updates = [c for c in js.calls if c[0] == "update"]
    # the first stream's raise twice refused, then done; the second's done at once
    assert [name for _, name, _ in updates] == ["VGE_EVENTS"] * 3 + ["VGE_DEAD_LETTERS"]
    assert all(replicas == 3 for _, _, replicas in updates)


async def test_a_stream_that_cannot_be_raised_is_kept_and_the_start_goes_on():
    js = JetStream(add=[STREAM_EXISTS_WITH_OTHER_SETTINGS, STREAM_EXISTS_WITH_OTHER_SETTINGS],
                   update=[NO_PLACEMENT] * 1_000)
    await ensure_streams(js, replicas=3, placement_wait=0.3)  # no error
    assert {name for kind, name, _ in js.calls if kind == "update"} == {"VGE_EVENTS", "VGE_DEAD_LETTERS"}


async def test_a_missing_stream_that_cannot_be_placed_stops_the_start():
    js = JetStream(add=[NO_PLACEMENT] * 1_000, update=[])
    with pytest.raises(nats.js.errors.BadRequestError) as refused:
        await ensure_streams(js, replicas=3, placement_wait=0.3)
    assert refused.value.err_code == NO_PLACEMENT
    assert len(js.calls) > 1 and {kind for kind, _, _ in js.calls} == {"add"}  # asked again first


async def test_a_request_jetstream_does_not_answer_is_asked_again():
    js = JetStream(add=[], update=[])
    timeouts = [nats.errors.TimeoutError(), nats.js.errors.ServiceUnavailableError()]
    add = js.add_stream

    async def add_stream(cfg) -> None:  # (a cluster electing its leader answers nothing, then 503)
        if timeouts:
            js.calls.append(("add", cfg.name, cfg.num_replicas))
            raise timeouts.pop(0)
        await add(cfg)

    js.add_stream = add_stream
    await ensure_streams(js, replicas=3, placement_wait=5)
    assert [name for kind, name, _ in js.calls if kind == "add"] == ["VGE_EVENTS"] * 3 + ["VGE_DEAD_LETTERS"]


async def test_other_refusals_are_not_asked_again():
    js = JetStream(add=[STREAM_EXISTS_WITH_OTHER_SETTINGS], update=[10_999])
    with pytest.raises(nats.js.errors.BadRequestError):
        await ensure_streams(js, replicas=3, placement_wait=5)
    assert [kind for kind, _, _ in js.calls] == ["add", "update"]
