"""What a proxy and a repository have in common: they host movers, counting the running ones."""

from __future__ import annotations

from typing import Any, TypeVar

from blockferry.errors import BlockferryError
from blockferry.jobs.messages import MoverInbox
from blockferry.runtime.actor import Actor, Completion, Decision

M = TypeVar("M")


class CapacityExceededError(BlockferryError):
    """A task was handed to a proxy or repository with no free slot (the scheduler never does)."""


class MoverHost(Actor[M]):
    """Spawns movers as children; ``load`` is how many run now, ``peak`` the most at once."""

    max_tasks: int

    def __init__(self, name: str, *, max_tasks: int, mailbox_size: int) -> None:
        super().__init__(name, mailbox_size=mailbox_size)
        self.max_tasks = max_tasks
        self.load = 0
        self.peak = 0
        self.tasks_run = 0
        self._movers: dict[Actor[MoverInbox], Completion[Any]] = {}

    async def host(self, mover: Actor[MoverInbox], done: Completion[Any]) -> tuple[Actor[MoverInbox], Completion[Any]]:
        """Start ``mover``; ``done`` completes with its result, or its error if it fails."""
        if self.load >= self.max_tasks:
            raise CapacityExceededError(f"{self.name}: {self.load} tasks running, limit {self.max_tasks}")
        self.load += 1
        self.peak = max(self.peak, self.load)
        self.tasks_run += 1
        self._movers[mover] = done
        try:
            await self.spawn(mover)
        except BaseException:
            self._finished(mover)
            raise
        self.start_soon(self._track, mover, done)
        return mover, done

    async def _track(self, mover: Actor[MoverInbox], done: Completion[Any]) -> None:
        try:
            await done.wait()
        except Exception:
            pass  # the job manager reports it
        finally:
            self._finished(mover)

    def _finished(self, mover: Actor[MoverInbox]) -> None:
        if self._movers.pop(mover, None) is not None:
            self.load -= 1

    async def on_child_failed(self, child: Actor[Any], error: BaseException, decision: Decision) -> Decision:
        done = self._movers.get(child)
        if done is not None:
            done.set_error(error)
        self.log.info("mover_failed", child=child.name, error=str(error))
        return decision
