"""The event bus: publishing never waits; a slow subscriber skips events and is told so."""

from __future__ import annotations

import pytest
from blockferry.runtime.events import EventBus


@pytest.mark.anyio
async def test_a_full_subscriber_skips_and_learns_how_many() -> None:
    bus = EventBus(buffer=2)
    slow = bus.subscribe(["progress"])
    other = bus.subscribe(["session"], job="a")
    for i in range(5):
        bus.publish("progress", {"job": "a", "i": i})  # returns at once although nobody reads
    bus.publish("session", {"job": "b", "state": "running"})  # another job: filtered out
    bus.publish("session", {"job": "a", "state": "running"})
    assert slow.delivered == 2 and slow.skipped == 3
    got = [slow.receive.receive_nowait(), slow.receive.receive_nowait()]
    assert [d["i"] for _, d, _ in got] == [0, 1]
    bus.publish("progress", {"job": "a", "i": 5})
    topic, data, skipped = slow.receive.receive_nowait()
    assert data["i"] == 5 and skipped == 3
    assert other.receive.receive_nowait()[1]["job"] == "a"
    assert bus.statistics()["skipped"] == 3


@pytest.mark.anyio
async def test_log_lines_filter_by_level_and_gone_subscribers_are_dropped() -> None:
    bus = EventBus()
    sub = bus.subscribe(["log"], level="warning")
    bus.log_processor(None, "info", {"event": "quiet"})
    bus.log_processor(None, "error", {"event": "loud", "obj": object()})  # unencodable values become text
    topic, data, _ = sub.receive.receive_nowait()
    assert data["event"] == "loud" and data["level"] == "error" and isinstance(data["obj"], str)
    sub.receive.close()
    bus.publish("log", {"event": "x", "level": "error"})
    assert bus.statistics()["subscriptions"] == 0
