"""The actor runtime (``blockferry.runtime.actor``): bounded mailboxes, tell and ask, the start handshake,
graceful stop, supervision, helper tasks. Every test runs on asyncio and on trio.

Synchronisation is done with events and ``anyio.wait_all_tasks_blocked()`` (never with sleeps);
``anyio.fail_after`` is only a safety net so that a broken feature fails instead of hanging.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from blockferry.errors import (
    ActorFailedError,
    ActorStoppedError,
    ChildFailedError,
    ConfigError,
    NotFoundError,
    unwrap_group,
)
from blockferry.runtime.actor import (
    DEFAULT_MAILBOX_SIZE,
    Actor,
    ChildFailure,
    Decision,
    MailboxStatistics,
    SupervisionPolicy,
)

pytestmark = pytest.mark.anyio

#: seconds; a safety net against hangs, never a way to wait for something
LIMIT = 5
#: a deliberately short ``ask`` timeout for the tests that expect one to expire
SHORT = 0.05

RESTART, STOP, ESCALATE = Decision.RESTART, Decision.STOP, Decision.ESCALATE


class Boom(Exception):
    """A programming error (not a BlockferryError) raised on purpose."""


class Caught:
    error: BaseException
    raw: BaseException


@contextmanager
def raises_leaf(kind: type[BaseException]) -> Iterator[Caught]:
    """Like ``pytest.raises`` but looks through the exception groups task groups wrap errors in."""
    caught = Caught()
    try:
        yield caught
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is the expected leaf
        leaf = unwrap_group(exc)
        if not isinstance(leaf, kind):
            raise
        caught.error, caught.raw = leaf, exc
    else:
        pytest.fail(f"did not raise {kind.__name__}")


async def _helper(started: anyio.Event, cancelled: anyio.Event) -> None:
    started.set()
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        cancelled.set()
        raise


class Probe(Actor[Any]):
    """A test actor driven by tuple messages; it records what it handles, starts and stops."""

    mailbox_size = 2

    def __init__(self, name: str, *, mailbox_size: int | None = None, journal: list[str] | None = None) -> None:
        super().__init__(name, mailbox_size=mailbox_size)
        self.journal = journal if journal is not None else []
        self.handled: list[Any] = []
        self.starts = 0
        self.stops = 0
        self.count = -1  # on_start sets it to 0: shows that a restart re-initialises state
        self.released: list[BaseException] = []  #: the errors on_failed was called with

    async def on_start(self) -> None:
        self.starts += 1
        self.count = 0
        self.journal.append(f"{self.name}:start")

    async def on_stop(self) -> None:
        self.stops += 1
        self.journal.append(f"{self.name}:stop")

    async def on_failed(self, error: BaseException) -> None:
        self.released.append(unwrap_group(error))

    async def handle(self, msg: Any) -> Any:
        match msg:
            case ("echo", value):
                return value
            case ("record", value):
                self.handled.append(value)
                self.count += 1
                return self.count
            case ("count",):
                return self.count
            case ("block", entered, release):
                entered.set()
                await release.wait()
                self.handled.append("block")
                return "released"
            case ("raise", error):
                raise error
            case ("spawn", child, policy):
                return await self.spawn(child, policy=policy)
            case ("spawn_catching", child):
                try:
                    await self.spawn(child)
                except Exception as exc:  # noqa: BLE001 - handed back to the test
                    return exc
                return None
            case ("helper", started, cancelled):
                self.start_soon(_helper, started, cancelled)
                return None
        raise AssertionError(f"unexpected message {msg!r}")


class Parent(Probe):
    """A supervisor: records every on_child_failed call, can override the decision, and can
    spawn children from on_start."""

    mailbox_size = 4

    def __init__(
        self,
        name: str,
        *,
        journal: list[str] | None = None,
        override: Decision | None = None,
        spawn_on_start: list[tuple[Actor[Any], SupervisionPolicy | None]] | None = None,
    ) -> None:
        super().__init__(name, journal=journal)
        self.seen: list[tuple[Actor[Any], BaseException, Decision]] = []
        self.override = override
        self.spawn_on_start = spawn_on_start or []

    async def on_start(self) -> None:
        await super().on_start()
        for child, policy in self.spawn_on_start:
            assert await self.spawn(child, policy=policy) is child

    async def on_child_failed(self, child: Actor[Any], error: BaseException, decision: Decision) -> Decision:
        self.seen.append((child, error, decision))
        proposed = await super().on_child_failed(child, error, decision)
        return self.override if self.override is not None else proposed


async def crash_by_tell(actor: Actor[Any], error: BaseException) -> BaseException:
    """Run ``actor`` and tell it to raise ``error``; returns the leaf error its run ended with."""
    with anyio.fail_after(LIMIT), raises_leaf(type(error)) as caught:
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            await actor.tell(("raise", error))
    return caught.error


async def block(actor: Actor[Any]) -> anyio.Event:
    """Make ``actor`` busy in a handler; returns the event that lets the handler finish."""
    entered, release = anyio.Event(), anyio.Event()
    await actor.tell(("block", entered, release))
    await entered.wait()
    return release


# -- mailbox configuration ---------------------------------------------------------------------


async def test_mailbox_size_from_constructor_argument() -> None:
    actor = Probe("a", mailbox_size=7)
    assert actor.statistics() == MailboxStatistics(depth=0, peak=0, capacity=7, waiting_senders=0, received=0)
    assert actor.state == "new"


async def test_mailbox_size_from_class_attribute_and_default() -> None:
    class Five(Probe):
        mailbox_size = 5

    class Plain(Actor[Any]):
        async def handle(self, msg: Any) -> Any:
            return msg

    assert Five("a").statistics().capacity == 5
    assert Five("b", mailbox_size=3).statistics().capacity == 3  # the argument wins over the class
    assert Plain("c").statistics().capacity == DEFAULT_MAILBOX_SIZE


@pytest.mark.parametrize("size", [0, -1, -64, 2.5, 4.0, "4"])
async def test_invalid_mailbox_size_argument_raises_config_error(size: Any) -> None:
    with pytest.raises(ConfigError, match="mailbox size of badbox"):
        Probe("badbox", mailbox_size=size)


@pytest.mark.parametrize("size", [0, -3, "8", 1.5])
async def test_invalid_mailbox_size_class_attribute_raises_config_error(size: Any) -> None:
    bad = type("BadBox", (Probe,), {"mailbox_size": size})
    with pytest.raises(ConfigError):
        bad("badbox")


# -- bounded mailbox: tell waits ---------------------------------------------------------------


async def test_tell_waits_while_the_mailbox_is_full() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=2).run)
            release = await block(actor)
            await actor.tell(("record", 1))
            await actor.tell(("record", 2))
            assert actor.statistics() == MailboxStatistics(depth=2, peak=2, capacity=2, waiting_senders=0, received=1)

            sent = anyio.Event()

            async def sender() -> None:
                await actor.tell(("record", 3))
                sent.set()

            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            stats = actor.statistics()
            assert not sent.is_set(), "tell returned although the mailbox was full"
            assert stats.waiting_senders == 1
            assert stats.depth == stats.capacity == 2
            assert stats.peak == 2

            release.set()
            await sent.wait()
            await actor.stop()
    assert actor.handled == ["block", 1, 2, 3]
    assert actor.statistics() == MailboxStatistics(depth=0, peak=2, capacity=2, waiting_senders=0, received=4)


async def test_depth_never_exceeds_capacity_with_many_blocked_senders() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=3).run)
            release = await block(actor)
            for i in range(7):
                tg.start_soon(actor.tell, ("record", i))
            await anyio.wait_all_tasks_blocked()
            stats = actor.statistics()
            assert stats.depth == 3
            assert stats.waiting_senders == 4
            assert stats.peak == 3
            release.set()
            await anyio.wait_all_tasks_blocked()  # every sender got its message in
            assert actor.statistics().waiting_senders == 0
            await actor.stop()
    assert sorted(actor.handled[1:]) == list(range(7))
    stats = actor.statistics()
    assert stats.peak == 3 and stats.depth == 0 and stats.waiting_senders == 0 and stats.received == 8


async def test_peak_records_the_largest_depth_seen() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=4).run)
            release = await block(actor)
            await actor.tell(("record", 1))
            await actor.tell(("record", 2))
            assert (actor.statistics().depth, actor.statistics().peak) == (2, 2)
            release.set()
            await anyio.wait_all_tasks_blocked()  # the actor handled everything and waits again
            assert (actor.statistics().depth, actor.statistics().peak) == (0, 2)  # peak stays
            assert actor.handled == ["block", 1, 2]

            release = await block(actor)
            for i in range(3):
                await actor.tell(("record", i))
            assert (actor.statistics().depth, actor.statistics().peak) == (3, 3)
            release.set()
            await anyio.wait_all_tasks_blocked()
            assert (actor.statistics().depth, actor.statistics().peak) == (0, 3)
            assert actor.statistics().received == 7  # two blocks, five records
            await actor.stop()


# -- ask ---------------------------------------------------------------------------------------


async def test_ask_returns_the_handlers_reply() -> None:
    payload = object()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a").run)
            assert await actor.ask(("echo", payload)) is payload
            assert await actor.ask(("record", "x")) == 1
            assert await actor.ask(("record", "y"), timeout=None) == 2
            await actor.stop()
    assert actor.handled == ["x", "y"]


async def test_ask_times_out_when_the_handler_does_not_answer() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a").run)
            entered, release = anyio.Event(), anyio.Event()
            with pytest.raises(TimeoutError):
                await actor.ask(("block", entered, release), timeout=SHORT)
            assert entered.is_set()  # the handler was running, it just did not answer in time
            release.set()
            assert actor.state == "running"
            assert await actor.ask(("echo", "later")) == "later"
            await actor.stop()


async def test_ask_timeout_includes_waiting_for_mailbox_space() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=1).run)
            release = await block(actor)
            await actor.tell(("record", "queued"))  # the mailbox is full now
            with pytest.raises(TimeoutError):
                await actor.ask(("record", "never queued"), timeout=SHORT)
            assert actor.statistics().waiting_senders == 0
            release.set()
            await actor.stop()
    assert actor.handled == ["block", "queued"]


async def test_engine_error_goes_back_to_the_asker_and_the_actor_keeps_running() -> None:
    error = NotFoundError("no restore point abc")
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a").run)
            with pytest.raises(NotFoundError) as info:
                await actor.ask(("raise", error))
            assert info.value is error
            assert actor.state == "running"
            assert await actor.ask(("record", "after")) == 1
            await actor.stop()
    assert actor.state == "stopped"


async def test_other_exception_fails_the_actor_and_the_asker_gets_actor_failed() -> None:
    boom = Boom("handler bug")
    outcome: dict[str, BaseException] = {}
    actor = Probe("a")

    async def asker() -> None:
        try:
            await actor.ask(("raise", boom))
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    with anyio.fail_after(LIMIT):
        # the asker lives outside the actor's task group, so the actor's failure does not cancel it
        async with anyio.create_task_group() as outer:
            with raises_leaf(Boom) as caught:
                async with anyio.create_task_group() as tg:
                    await tg.start(actor.run)
                    outer.start_soon(asker)
                    # leaving this block waits for the actor, which fails on the message
    assert caught.error is boom
    assert isinstance(outcome["error"], ActorFailedError)
    assert unwrap_group(outcome["error"].__cause__) is boom
    assert actor.state == "failed"
    assert actor.released == [boom] and actor.stops == 0  # nobody restarts it: it let go of what it held


async def test_a_cancelled_actor_lets_go_of_what_it_holds() -> None:
    """Cancelled (its task group was), the actor never reaches on_stop: on_failed runs, shielded,
    even for a supervised child (no restart follows a cancellation)."""
    actor = Probe("a")
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent").run)
            child = await parent.ask(("spawn", Probe("child"), SupervisionPolicy(max_restarts=3, then=STOP)))
            await tg.start(actor.run)
            await block(actor)
            tg.cancel_scope.cancel()
    cancelled = anyio.get_cancelled_exc_class()
    assert [type(e) for e in actor.released] == [cancelled] and actor.stops == 0
    assert [type(e) for e in child.released] == [cancelled] and child.starts == 1
    assert [type(e) for e in parent.released] == [cancelled]


async def test_a_failing_release_does_not_hide_the_failure() -> None:
    class BadRelease(Probe):
        async def on_failed(self, error: BaseException) -> None:
            await super().on_failed(error)
            raise RuntimeError("cannot release")

    boom = Boom("handler bug")
    actor = BadRelease("a")
    assert await crash_by_tell(actor, boom) is boom
    assert actor.released == [boom]


async def test_engine_error_while_handling_a_tell_fails_the_actor() -> None:
    error = NotFoundError("nobody to answer to")
    actor = Probe("a")
    assert await crash_by_tell(actor, error) is error
    assert actor.state == "failed"


# -- start handshake ---------------------------------------------------------------------------


async def test_start_returns_only_after_on_start_finished() -> None:
    events: list[tuple[str, str | None]] = []
    gate = anyio.Event()

    class SlowStart(Probe):
        async def on_start(self) -> None:
            events.append(("on_start begins", self.state))
            await gate.wait()
            await super().on_start()
            events.append(("on_start ends", self.state))

    async def opener() -> None:
        await anyio.wait_all_tasks_blocked()  # on_start is waiting on the gate now
        events.append(("gate opened", None))
        gate.set()

    probe = SlowStart("slow")
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(opener)
            actor = await tg.start(probe.run)
            events.append(("start returned", actor.state))
            assert actor is probe
            assert actor.starts == 1 and actor.count == 0
            await actor.stop()
    assert events == [
        ("on_start begins", "starting"),
        ("gate opened", None),
        ("on_start ends", "starting"),
        ("start returned", "running"),
    ]


async def test_on_start_error_propagates_out_of_start() -> None:
    boom = Boom("cannot open the device")

    class BadStart(Probe):
        async def on_start(self) -> None:
            raise boom

    actor = BadStart("bad")
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            with raises_leaf(Boom) as caught:
                await tg.start(actor.run)
            # the task group is still usable: the error came out of start() only
            other = await tg.start(Probe("other").run)
            assert await other.ask(("echo", 1)) == 1
            await other.stop()
    assert caught.error is boom
    assert actor.state == "failed"
    assert actor.handled == []


async def test_run_refuses_an_actor_that_is_already_running() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a").run)
            with raises_leaf(RuntimeError):
                await tg.start(actor.run)
            assert actor.state == "running"
            assert await actor.ask(("echo", "fine")) == "fine"
            await actor.stop()
    with raises_leaf(RuntimeError):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)  # a stopped actor does not run again


# -- graceful stop -----------------------------------------------------------------------------


async def test_stop_handles_every_queued_message_first() -> None:
    replies: list[Any] = []
    stopped = anyio.Event()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=4).run)
            release = await block(actor)
            await actor.tell(("record", 1))
            await actor.tell(("record", 2))

            async def asker() -> None:
                replies.append(await actor.ask(("echo", "asked")))

            async def stopper() -> None:
                await actor.stop()
                stopped.set()

            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            assert actor.statistics().depth == 3
            tg.start_soon(stopper)
            await anyio.wait_all_tasks_blocked()
            assert not stopped.is_set(), "stop() returned before the queued messages were handled"
            with pytest.raises(ActorStoppedError):
                await actor.tell(("record", "too late"))  # stop() closes the mailbox at once

            release.set()
            await stopped.wait()
            assert actor.handled == ["block", 1, 2]
            assert replies == ["asked"]
            assert actor.state == "stopped"
            assert actor.stops == 1
    assert actor.statistics().received == 4


async def test_senders_blocked_on_a_full_mailbox_at_stop_are_never_silently_dropped() -> None:
    """A sender still waiting for mailbox space when stop() comes was not accepted yet: it either
    gets its message in (and then it is handled, since stop drains) or gets ActorStoppedError;
    a tell that returned normally is never dropped and an ask never hangs."""
    outcome: dict[str, Any] = {}
    stopped = anyio.Event()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=1).run)
            release = await block(actor)
            await actor.tell(("record", "queued"))

            async def teller() -> None:
                try:
                    await actor.tell(("record", "told"))
                    outcome["tell"] = "returned"
                except ActorStoppedError:
                    outcome["tell"] = "refused"

            async def asker() -> None:
                try:
                    outcome["ask"] = await actor.ask(("echo", "asked"))
                except ActorStoppedError:
                    outcome["ask"] = "refused"

            async def stopper() -> None:
                await actor.stop()
                stopped.set()

            tg.start_soon(teller)
            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            assert actor.statistics().waiting_senders == 2
            tg.start_soon(stopper)
            await anyio.wait_all_tasks_blocked()
            release.set()
            await stopped.wait()
    assert actor.handled[:2] == ["block", "queued"]  # what was queued is handled
    assert ("told" in actor.handled) == (outcome["tell"] == "returned")
    assert outcome["ask"] in ("asked", "refused")
    assert actor.state == "stopped"


async def test_stop_without_drain_fails_queued_asks_and_drops_queued_tells() -> None:
    outcome: dict[str, Any] = {}
    stopped = anyio.Event()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a", mailbox_size=4).run)
            release = await block(actor)
            await actor.tell(("record", "dropped"))

            async def asker() -> None:
                try:
                    outcome["reply"] = await actor.ask(("record", "rejected"))
                except Exception as exc:  # noqa: BLE001 - inspected below
                    outcome["error"] = exc

            async def stopper() -> None:
                await actor.stop(drain=False)
                stopped.set()

            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            assert actor.statistics().depth == 2
            tg.start_soon(stopper)
            await anyio.wait_all_tasks_blocked()
            release.set()  # the message being handled when stop came is finished
            await stopped.wait()
    assert "reply" not in outcome
    assert isinstance(outcome["error"], ActorStoppedError)
    assert actor.handled == ["block"]
    assert actor.state == "stopped"
    assert actor.stops == 1


async def test_after_stop_tell_and_ask_raise_and_stopping_twice_is_fine() -> None:
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a").run)
            assert actor.state == "running"
            await actor.stop()
            assert actor.state == "stopped"
            assert actor.stops == 1
            with pytest.raises(ActorStoppedError):
                await actor.tell(("record", "x"))
            with pytest.raises(ActorStoppedError):
                await actor.ask(("echo", "x"))
            await actor.stop()
            await actor.stop(drain=False)
    assert actor.state == "stopped"
    assert actor.stops == 1  # on_stop ran exactly once
    assert actor.released == []  # a stop is not a failure
    assert actor.handled == []


async def test_stopping_an_actor_that_never_ran() -> None:
    outcome: dict[str, BaseException] = {}
    actor = Probe("idle", mailbox_size=2)

    async def asker() -> None:
        try:
            await actor.ask(("echo", 1))
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            assert actor.statistics().depth == 1
            await actor.stop()
    assert isinstance(outcome["error"], ActorStoppedError)
    with pytest.raises(ActorStoppedError):
        await actor.tell(("echo", 2))
    with pytest.raises(ActorStoppedError):
        await actor.ask(("echo", 3))
    await actor.stop()  # again: still fine
    assert actor.starts == 0 and actor.stops == 0


async def test_an_actor_stopped_before_it_ran_is_stopped_for_good() -> None:
    """stop() on a never-run actor closes its mailbox for good, so the actor must be "stopped"
    and run() must refuse it, like any stopped actor. (Today it stays "new", and run() starts it
    and then crashes on the closed mailbox with ClosedResourceError.)"""
    actor = Probe("idle")
    await actor.stop()
    assert actor.state == "stopped"
    with anyio.fail_after(LIMIT), raises_leaf(RuntimeError):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)


# -- supervision -------------------------------------------------------------------------------


async def test_supervision_policy_decide() -> None:
    policy = SupervisionPolicy(max_restarts=2, then=STOP)
    assert [policy.decide(n) for n in range(4)] == [RESTART, RESTART, STOP, STOP]
    assert SupervisionPolicy().decide(0) is ESCALATE
    assert Actor.supervision == SupervisionPolicy(max_restarts=0, then=ESCALATE)


async def test_child_restarted_on_the_same_mailbox_then_left_stopped() -> None:
    policy = SupervisionPolicy(max_restarts=2, then=STOP)
    errors = [Boom(f"crash {i}") for i in range(3)]
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent").run)
            child = Probe("child")
            assert await parent.ask(("spawn", child, policy)) is child
            assert parent.children == (child,)
            assert await child.ask(("record", "a")) == 1
            assert await child.ask(("record", "b")) == 2

            for i in range(2):
                with pytest.raises(ActorFailedError) as info:
                    await child.ask(("raise", errors[i]))
                assert unwrap_group(info.value.__cause__) is errors[i]
                # sent after the crash to the same reference: the restarted child handles it, with
                # the state its on_start re-initialised
                assert await child.ask(("count",)) == 0
                assert child.starts == i + 2
                assert child.state == "running"
                assert await child.ask(("record", f"after {i}")) == 1

            assert child.released == []  # a restart keeps what the child holds
            with pytest.raises(ActorFailedError):
                await child.ask(("raise", errors[2]))
            # restarts used up: the child stays stopped (having let go of what it held), the
            # parent keeps working
            assert child.released == [errors[2]]
            with pytest.raises(ActorStoppedError):
                await child.ask(("echo", "anyone?"))
            with pytest.raises(ActorStoppedError):
                await child.tell(("echo", "anyone?"))
            assert child.starts == 3
            assert parent.state == "running"
            assert await parent.ask(("echo", "still here")) == "still here"
            assert parent.children == ()
            assert parent.seen == [(child, errors[0], RESTART), (child, errors[1], RESTART), (child, errors[2], STOP)]
            assert parent.child_failures == [
                ChildFailure("child", errors[0], RESTART, 0),
                ChildFailure("child", errors[1], RESTART, 1),
                ChildFailure("child", errors[2], STOP, 2),
            ]
            await parent.stop()
    assert parent.state == "stopped"
    assert child.handled == ["a", "b", "after 0", "after 1"]


async def test_messages_queued_behind_a_crash_are_handled_by_the_restarted_child() -> None:
    policy = SupervisionPolicy(max_restarts=1, then=STOP)
    boom = Boom("crash")
    replies: list[Any] = []
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent").run)
            child = await parent.ask(("spawn", Probe("child", mailbox_size=2), policy))
            assert await child.ask(("record", "before")) == 1
            release = await block(child)
            await child.tell(("raise", boom))

            async def asker() -> None:
                replies.append(await child.ask(("record", "queued")))

            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            assert child.statistics().depth == 2
            release.set()
            assert await child.ask(("echo", "sync")) == "sync"
            assert replies == [1]  # handled after the restart: the count started again from 0
            assert child.starts == 2
            assert parent.child_failures == [ChildFailure("child", boom, RESTART, 0)]
            await parent.stop()
    assert child.handled == ["before", "block", "queued"]


async def test_escalate_fails_the_parent_with_child_failed_error() -> None:
    policy = SupervisionPolicy(max_restarts=1, then=ESCALATE)
    errors = [Boom("first"), Boom("second")]
    parent = Parent("parent")
    child = Probe("child")
    with anyio.fail_after(LIMIT), raises_leaf(ChildFailedError) as caught:
        async with anyio.create_task_group() as tg:
            await tg.start(parent.run)
            await parent.ask(("spawn", child, policy))
            with pytest.raises(ActorFailedError):
                await child.ask(("raise", errors[0]))
            assert await child.ask(("count",)) == 0  # restarted once
            await child.tell(("raise", errors[1]))
            # leaving this block waits for the parent, which fails
    error = caught.error
    assert isinstance(error, ChildFailedError)
    assert error.child == "child"
    assert error.error is errors[1]
    assert error.__cause__ is errors[1]
    assert parent.state == "failed"
    assert parent.seen == [(child, errors[0], RESTART), (child, errors[1], ESCALATE)]
    assert parent.child_failures == [
        ChildFailure("child", errors[0], RESTART, 0),
        ChildFailure("child", errors[1], ESCALATE, 1),
    ]
    with pytest.raises(ActorStoppedError):
        await child.tell(("echo", "anyone?"))


async def test_default_policy_escalates_on_the_first_failure() -> None:
    boom = Boom("no second chance")
    parent = Parent("parent")
    child = Probe("child")
    with anyio.fail_after(LIMIT), raises_leaf(ChildFailedError) as caught:
        async with anyio.create_task_group() as tg:
            await tg.start(parent.run)
            await parent.ask(("spawn", child, None))
            await child.tell(("raise", boom))
    assert caught.error.child == "child"
    assert caught.error.error is boom
    assert parent.child_failures == [ChildFailure("child", boom, ESCALATE, 0)]
    assert child.starts == 1


async def test_policy_from_the_child_class_unless_spawn_gives_one() -> None:
    class Fragile(Probe):
        supervision = SupervisionPolicy(max_restarts=1, then=STOP)

    errors = [Boom("a1"), Boom("a2"), Boom("b1")]
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent").run)
            a = await parent.ask(("spawn", Fragile("a"), None))  # class policy: one restart
            b = await parent.ask(("spawn", Fragile("b"), SupervisionPolicy(then=STOP)))  # no restart
            with pytest.raises(ActorFailedError):
                await a.ask(("raise", errors[0]))
            assert await a.ask(("count",)) == 0
            with pytest.raises(ActorFailedError):
                await a.ask(("raise", errors[1]))
            with pytest.raises(ActorFailedError):
                await b.ask(("raise", errors[2]))
            with pytest.raises(ActorStoppedError):
                await a.ask(("echo", 1))
            with pytest.raises(ActorStoppedError):
                await b.ask(("echo", 1))
            assert parent.child_failures == [
                ChildFailure("a", errors[0], RESTART, 0),
                ChildFailure("a", errors[1], STOP, 1),
                ChildFailure("b", errors[2], STOP, 0),
            ]
            assert (a.starts, b.starts) == (2, 1)
            assert await parent.ask(("echo", "ok")) == "ok"
            await parent.stop()


async def test_on_child_failed_override_stop_instead_of_escalate() -> None:
    boom = Boom("crash")
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent", override=STOP).run)
            child = await parent.ask(("spawn", Probe("child"), SupervisionPolicy(then=ESCALATE)))
            with pytest.raises(ActorFailedError):
                await child.ask(("raise", boom))
            with pytest.raises(ActorStoppedError):
                await child.ask(("echo", 1))
            assert parent.seen == [(child, boom, ESCALATE)]  # what the policy proposed
            assert parent.child_failures == [ChildFailure("child", boom, STOP, 0)]  # what was applied
            assert parent.state == "running"
            assert await parent.ask(("echo", "alive")) == "alive"
            await parent.stop()
    assert parent.state == "stopped"


async def test_on_child_failed_override_restart_instead_of_escalate() -> None:
    errors = [Boom("one"), Boom("two")]
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent", override=RESTART).run)
            child = await parent.ask(("spawn", Probe("child"), SupervisionPolicy(then=ESCALATE)))
            for error in errors:
                with pytest.raises(ActorFailedError):
                    await child.ask(("raise", error))
                assert await child.ask(("count",)) == 0
            assert child.starts == 3
            assert parent.seen == [(child, errors[0], ESCALATE), (child, errors[1], ESCALATE)]
            assert parent.child_failures == [
                ChildFailure("child", errors[0], RESTART, 0),
                ChildFailure("child", errors[1], RESTART, 1),
            ]
            assert parent.state == "running"
            await parent.stop()
    assert child.state == "stopped"


async def test_children_spawned_from_on_start_are_running_and_supervised() -> None:
    a, b = Probe("a"), Probe("b")
    boom = Boom("b crashed")
    parent = Parent("parent", spawn_on_start=[(a, None), (b, SupervisionPolicy(max_restarts=1, then=STOP))])
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            await tg.start(parent.run)
            assert parent.children == (a, b)
            assert a.state == b.state == "running"
            assert await a.ask(("echo", "a")) == "a"
            with pytest.raises(ActorFailedError):
                await b.ask(("raise", boom))
            assert await b.ask(("count",)) == 0
            assert parent.seen == [(b, boom, RESTART)]
            assert parent.child_failures == [ChildFailure("b", boom, RESTART, 0)]
            await parent.stop()
    assert a.state == b.state == "stopped"


async def test_spawn_raises_the_childs_start_error() -> None:
    """A child whose on_start fails: spawn() raises that error (doc of Actor.spawn), the child is
    not recorded as a child, and the parent carries on."""
    boom = Boom("child cannot start")

    class BadStart(Probe):
        async def on_start(self) -> None:
            raise boom

    child = BadStart("child")
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent").run)
            error = await parent.ask(("spawn_catching", child))
            assert unwrap_group(error) is boom, f"spawn raised {error!r} instead of the child's error"
            assert parent.children == ()
            assert parent.child_failures == [] and parent.seen == []
            assert child.state == "failed"
            assert child.released == [boom]  # what on_start had taken is let go
            assert parent.state == "running"
            assert await parent.ask(("echo", "alive")) == "alive"
            await parent.stop()


async def test_spawn_needs_a_running_parent() -> None:
    parent = Parent("parent")
    with pytest.raises(RuntimeError):
        await parent.spawn(Probe("child"))
    assert parent.children == ()


# -- children stop with their parent -----------------------------------------------------------


async def test_children_are_stopped_youngest_first_before_the_parent() -> None:
    journal: list[str] = []
    a, b, c = (Probe(n, journal=journal) for n in "abc")
    parent = Parent("parent", journal=journal, spawn_on_start=[(a, None)])
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            await tg.start(parent.run)
            await parent.ask(("spawn", b, None))
            await parent.ask(("spawn", c, None))
            assert parent.children == (a, b, c)
            await parent.stop()
            stops = [entry for entry in journal if entry.endswith(":stop")]
            assert stops == ["c:stop", "b:stop", "a:stop", "parent:stop"]
            assert [x.state for x in (a, b, c, parent)] == ["stopped"] * 4
            assert parent.children == ()


@pytest.mark.parametrize("drain", [True, False])
async def test_parent_stop_drains_children_only_when_draining(drain: bool) -> None:
    outcome: dict[str, Any] = {}
    stopped = anyio.Event()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            parent = await tg.start(Parent("parent").run)
            child = await parent.ask(("spawn", Probe("child", mailbox_size=2), None))
            release = await block(child)

            async def asker() -> None:
                try:
                    outcome["reply"] = await child.ask(("record", "queued"))
                except Exception as exc:  # noqa: BLE001 - inspected below
                    outcome["error"] = exc

            async def stopper() -> None:
                await parent.stop(drain=drain)
                stopped.set()

            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(stopper)
            await anyio.wait_all_tasks_blocked()
            assert not stopped.is_set()  # the parent waits for its busy child
            release.set()
            await stopped.wait()
    assert child.state == "stopped" and parent.state == "stopped"
    if drain:
        assert outcome == {"reply": 1}
        assert child.handled == ["block", "queued"]
    else:
        assert isinstance(outcome.get("error"), ActorStoppedError)
        assert child.handled == ["block"]


# -- helper tasks ------------------------------------------------------------------------------


async def test_start_soon_helpers_are_cancelled_when_the_actor_stops() -> None:
    started, cancelled = anyio.Event(), anyio.Event()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Probe("a").run)
            await actor.ask(("helper", started, cancelled))
            await started.wait()
            await anyio.wait_all_tasks_blocked()
            assert not cancelled.is_set()  # the helper lives as long as the actor
            assert await actor.ask(("echo", 1)) == 1
            await actor.stop()
            assert cancelled.is_set()
            assert actor.state == "stopped"
            with pytest.raises(RuntimeError):
                actor.start_soon(_helper, anyio.Event(), anyio.Event())


async def test_start_soon_needs_a_running_actor() -> None:
    with pytest.raises(RuntimeError):
        Probe("a").start_soon(_helper, anyio.Event(), anyio.Event())


# -- work done for an asker (Running, ask_work) ------------------------------------------------


class Worker(Actor[Any]):
    """Does ("work", entered, release) in a helper task: it waits for ``release``, and records
    that its clean-up ran to the end when it is cancelled."""

    def __init__(self) -> None:
        super().__init__("worker")
        self.cleaned = False
        self.cleaned_before_stop: bool | None = None

    async def on_stop(self) -> None:
        self.cleaned_before_stop = self.cleaned

    async def _work(self, entered: anyio.Event, release: anyio.Event) -> str:
        entered.set()
        try:
            await release.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # a clean-up that awaits (a store reloading its index, say)
                self.cleaned = True
        return "done"

    async def _fail(self) -> str:
        raise NotFoundError("no such thing")

    async def handle(self, msg: Any) -> Any:
        match msg:
            case ("work", entered, release):
                return self.start_work(lambda: self._work(entered, release), "the work")
            case ("fail",):
                return self.start_work(self._fail, "the failing work")
            case ("echo", value):
                return value
        raise AssertionError(f"unexpected message {msg!r}")


async def test_work_for_an_asker_leaves_the_mailbox_free_and_answers_with_its_result_or_error() -> None:
    entered, release = anyio.Event(), anyio.Event()
    results: list[Any] = []
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(Worker().run)

            async def asker() -> None:
                results.append(await actor.ask_work(("work", entered, release)))

            tg.start_soon(asker)
            await entered.wait()
            assert await actor.ask(("echo", 7)) == 7  # answered while the work goes on
            assert results == []
            release.set()
            await anyio.wait_all_tasks_blocked()
            assert results == ["done"]
            with pytest.raises(NotFoundError, match="no such thing"):
                await actor.ask_work(("fail",))
            assert actor.state == "running"  # the work's error went to the asker only
            await actor.stop()


async def test_cancelling_the_asker_cancels_the_work_and_waits_until_it_has_ended() -> None:
    entered, release = anyio.Event(), anyio.Event()
    worker = Worker()
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(worker.run)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as inner:
                    async def cancel_once_entered() -> None:
                        await entered.wait()
                        scope.cancel()

                    inner.start_soon(cancel_once_entered)
                    await actor.ask_work(("work", entered, release))
            assert scope.cancelled_caught
            assert worker.cleaned  # ask_work returned only once the work had ended
            assert not release.is_set()
            assert await actor.ask(("echo", 1)) == 1
            await actor.stop()


async def test_work_still_going_when_its_actor_stops_ends_before_on_stop_and_fails_the_asker() -> None:
    entered, release = anyio.Event(), anyio.Event()
    worker = Worker()
    errors: list[BaseException] = []
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            actor = await tg.start(worker.run)

            async def asker() -> None:
                try:
                    await actor.ask_work(("work", entered, release))
                except ActorStoppedError as exc:
                    errors.append(exc)

            tg.start_soon(asker)
            await entered.wait()
            await actor.stop()  # work still going is cancelled when the actor stops
            await anyio.wait_all_tasks_blocked()
    assert worker.cleaned_before_stop  # it ended before on_stop (which may release what it uses)
    assert len(errors) == 1 and "the work stopped before it finished" in str(errors[0])
