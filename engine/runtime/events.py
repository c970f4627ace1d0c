"""Events for subscribers: job progress, session state changes, log lines.

Publishing never waits: each subscription has a bounded buffer, and when it is full the event is
dropped for that subscriber only and counted; the next event it does get says how many it missed
(``skipped``). A slow client therefore loses events, never slows a job.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import MutableMapping
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from blockferry.log import LEVELS

TOPICS = ("progress", "session", "log")


class Subscription:
    """What one client asked to hear. Read ``(topic, data, skipped)`` tuples from ``receive``."""

    def __init__(self, sid: int, topics: frozenset[str], job: str | None, session: int | None, level: int,
                 buffer: int) -> None:
        self.id = sid
        self.topics = topics
        self.job = job
        self.session = session
        self.level = level
        self._send: MemoryObjectSendStream[tuple[str, Any, int]]
        self._send, self.receive = anyio.create_memory_object_stream[tuple[str, Any, int]](buffer)
        self.delivered = 0
        self.skipped = 0  #: dropped in all
        self._pending_skips = 0  #: dropped since the last delivered event

    def __repr__(self) -> str:
        return f"<Subscription {self.id} {','.join(sorted(self.topics))} delivered={self.delivered} skipped={self.skipped}>"

    def matches(self, topic: str, data: dict[str, Any]) -> bool:
        if topic not in self.topics:
            return False
        if self.job is not None and data.get("job") != self.job:
            return False
        if self.session is not None and topic != "log" and data.get("session") != self.session:
            return False
        return topic != "log" or LEVELS.get(str(data.get("level", "info")), 20) >= self.level

    def offer(self, topic: str, data: Any) -> bool:
        """Queue the event unless the buffer is full; False if the subscriber is gone."""
        try:
            self._send.send_nowait((topic, data, self._pending_skips))
        except anyio.WouldBlock:
            self._pending_skips += 1
            self.skipped += 1
            return True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        self._pending_skips = 0
        self.delivered += 1
        return True

    def close(self) -> None:
        self._send.close()
        self.receive.close()


class EventBus:
    """Fan-out of events to subscriptions. Create it in the event loop's thread."""

    def __init__(self, buffer: int = 256) -> None:
        self.buffer = buffer
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._thread = threading.get_ident()
        self.published = 0

    def __repr__(self) -> str:
        return f"<EventBus subscriptions={len(self._subs)} published={self.published}>"

    def subscribe(self, topics: list[str], *, job: str | None = None, session: int | None = None,
                  level: str = "info") -> Subscription:
        sub = Subscription(next(self._ids), frozenset(topics), job, session, LEVELS.get(level, 20), self.buffer)
        self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.pop(sub.id, None)
        sub.close()

    def wants(self, topic: str) -> bool:
        return any(topic in s.topics for s in self._subs.values())

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Offer an event to every matching subscription; never waits."""
        if threading.get_ident() != self._thread:
            return  # memory streams belong to the event loop; worker-thread logs reach the file only
        self.published += 1
        for sub in list(self._subs.values()):
            if sub.matches(topic, data) and not sub.offer(topic, data):
                self.unsubscribe(sub)

    def statistics(self) -> dict[str, Any]:
        return {"subscriptions": len(self._subs), "published": self.published,
                "skipped": sum(s.skipped for s in self._subs.values())}

    def log_processor(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """A structlog processor that copies each log event to ``log`` subscribers."""
        if self._subs and self.wants("log"):
            try:
                data = msgspec.json.decode(msgspec.json.encode(dict(event), enc_hook=repr))
            except (TypeError, ValueError, msgspec.EncodeError):
                data = {k: repr(v) for k, v in event.items()}
            data.setdefault("level", method)
            self.publish("log", data)
        return event


__all__ = ["EventBus", "Subscription", "TOPICS"]
