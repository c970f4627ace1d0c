"""Proxy: runs source movers, at most ``max_tasks`` at once, for the sources it can reach."""

from __future__ import annotations

from typing import Any

from blockferry.actors._host import MoverHost
from blockferry.actors.source_mover import SourceMover
from blockferry.errors import BlockferryError
from blockferry.jobs.config import ProxyConfig
from blockferry.jobs.messages import ProxyInbox, ProxyStatus, ProxyStatusQuery, RunSource, UpdateProxy
from blockferry.repo.format import TaskStats
from blockferry.runtime.actor import Completion
from blockferry.runtime.resources import Runtime


class Proxy(MoverHost[ProxyInbox]):
    def __init__(self, config: ProxyConfig, runtime: Runtime) -> None:
        super().__init__(f"proxy:{config.name}", max_tasks=config.max_tasks, mailbox_size=runtime.settings.mailbox_size)
        self.config = config
        self.runtime = runtime

    def __repr__(self) -> str:
        return (f"<Proxy {self.config.name} tasks={self.load}/{self.max_tasks} "
                f"transports={','.join(self.config.transports)}>")

    async def handle(self, msg: ProxyInbox) -> Any:
        match msg:
            case RunSource(task=task, out=out):
                done: Completion[TaskStats] = Completion()
                return await self.host(SourceMover(task, out, self.runtime, done), done)
            case ProxyStatusQuery():
                return ProxyStatus(name=self.config.name, load=self.load, peak=self.peak, max_tasks=self.max_tasks,
                                   tasks_run=self.tasks_run, transports=list(self.config.transports))
            case UpdateProxy(config=config):  # its limit applies to the tasks it starts from now on
                self.config, self.max_tasks = config, config.max_tasks
                return None
        raise BlockferryError(f"{self.name}: unexpected message {type(msg).__name__}")
