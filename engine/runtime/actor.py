"""The actor runtime: bounded mailboxes, tell and ask, start handshakes, graceful stop, supervision.

An :class:`Actor` owns a mailbox (an anyio memory object stream with a finite buffer) and a task
group. Its entry point follows the anyio convention::

    async with anyio.create_task_group() as tg:
        actor = await tg.start(MyActor("name").run)
        await actor.tell(Msg(...))            # waits while the mailbox is full
        answer = await actor.ask(Query(), timeout=5)
        await actor.stop()                    # handles what is queued, then stops

Children are started with :meth:`Actor.spawn` inside the parent's task group, so a parent never
outlives what it started. When a child fails, the parent's :meth:`Actor.on_child_failed` learns
which child and why, and the child's :class:`SupervisionPolicy` decides: restart it (the same
mailbox, so senders keep their reference), leave it stopped, or fail the parent.

Only anyio is used, so actors run on asyncio and on trio.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from blockferry.errors import (
    ActorFailedError,
    ActorStoppedError,
    BlockferryError,
    ChildFailedError,
    ConfigError,
    unwrap_group,
)
from blockferry.log import get_logger

M = TypeVar("M")
T = TypeVar("T")

#: what ``mailbox_size`` defaults to when neither the class nor the caller sets it
DEFAULT_MAILBOX_SIZE = 64


class Completion(Generic[T]):
    """A one-shot result that one task sets and others await (a reply, or a running task's end).

    Must be created inside a running event loop (it holds an anyio Event).
    """

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set_result(self, value: T) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def set_error(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> T:
        """The result, or raise the error it was completed with."""
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Running(Generic[T]):
    """Work an actor does for an asker in a helper task, so that its mailbox stays free meanwhile
    (a lifecycle operation on a repository while backups go on): the reply to such an ``ask``.

    The asker awaits :meth:`outcome`. If the asker is cancelled meanwhile, the work is cancelled
    too, and :meth:`outcome` waits until it has ended before the cancellation goes on, as if the
    work had run in the asker's own task. If the owning actor stops first, the work is cancelled
    before the actor's ``on_stop`` and the asker gets ActorStoppedError.
    """

    __slots__ = ("_done", "_ended", "_scope")

    def __init__(self) -> None:
        self._done: Completion[T] = Completion()
        self._ended = anyio.Event()
        self._scope = anyio.CancelScope()

    async def run(self, fn: Callable[[], Awaitable[T]], what: str) -> None:
        """Run ``fn`` (in the owning actor's helper task); never raises an Exception: it goes to
        the asker."""
        try:
            with self._scope:
                try:
                    self._done.set_result(await fn())
                except Exception as exc:
                    self._done.set_error(exc)
        finally:
            if not self._done.done:  # cancelled: by the asker, or the owner stopped
                self._done.set_error(ActorStoppedError(f"{what} stopped before it finished"))
            self._ended.set()

    async def outcome(self) -> T:
        """The work's result (or its error); see the class docstring for cancellation."""
        try:
            return await self._done.wait()
        finally:
            if not self._ended.is_set():
                await self.cancel_and_wait()

    async def cancel_and_wait(self) -> None:
        """Cancel the work (if it still goes) and wait until it has ended."""
        self._scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._ended.wait()


class _Envelope:
    __slots__ = ("msg", "reply")

    def __init__(self, msg: Any, reply: Completion[Any] | None) -> None:
        self.msg = msg
        self.reply = reply


class MailboxStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a mailbox: how full it is now, how full it ever was, who is waiting."""

    depth: int  #: messages queued now
    peak: int  #: the largest depth seen since the actor was created
    capacity: int  #: the mailbox's bound
    waiting_senders: int  #: tasks blocked in tell/ask because the mailbox is full
    received: int  #: messages taken out of the mailbox so far


class Decision(enum.Enum):
    """What happens to a failed child."""

    RESTART = "restart"  #: run it again on the same mailbox
    STOP = "stop"  #: leave it stopped; queued asks get ActorStoppedError
    ESCALATE = "escalate"  #: fail the parent with ChildFailedError


class SupervisionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Restart a failed child up to ``max_restarts`` times, then ``then`` (escalate by default)."""

    max_restarts: int = 0
    then: Decision = Decision.ESCALATE

    def decide(self, restarts_so_far: int) -> Decision:
        return Decision.RESTART if restarts_so_far < self.max_restarts else self.then


class ChildFailure(msgspec.Struct, frozen=True):
    """The record a parent keeps of a child's failure."""

    child: str
    error: BaseException
    decision: Decision
    restarts: int


class Actor(Generic[M]):
    """Base class of every role. Subclasses implement :meth:`handle` (a ``match`` over the
    message union) and optionally :meth:`on_start` / :meth:`on_stop`.

    Handling is one message at a time. An engine error (:class:`BlockferryError`) raised while
    handling an ``ask`` goes back to the asker and the actor carries on; any other exception, or
    any exception while handling a ``tell``, fails the actor and its supervisor decides.
    """

    #: mailbox bound for instances that are not given one
    mailbox_size: int = DEFAULT_MAILBOX_SIZE
    #: the policy a parent applies when this actor fails, unless spawn() is given another
    supervision: SupervisionPolicy = SupervisionPolicy()

    def __init__(self, name: str, *, mailbox_size: int | None = None) -> None:
        size = type(self).mailbox_size if mailbox_size is None else mailbox_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"mailbox size of {name} must be a whole number >= 1, not {size!r}")
        self.name = name
        self._send, self._recv = anyio.create_memory_object_stream[_Envelope](size)
        self._peak = 0
        self._received = 0
        self._state = "new"
        self._reject = False
        self._started_once = False
        self._supervised = False  # a parent will decide what happens when it fails
        self._current: _Envelope | None = None
        self._tg: TaskGroup | None = None
        self._done: anyio.Event | None = None
        self._children: list[Actor[Any]] = []
        self._works: set[Running[Any]] = set()
        self.child_failures: list[ChildFailure] = []
        self.log = get_logger(actor=name)

    def __repr__(self) -> str:
        s = self._send.statistics()
        return f"<{type(self).__name__} {self.name} {self._state} mailbox={s.current_buffer_used}/{s.max_buffer_size}>"

    # -- what subclasses implement -------------------------------------------------------------

    async def on_start(self) -> None:
        """Prepare state; runs inside the actor's task group before it reports started."""

    async def handle(self, msg: M) -> Any:
        """Handle one message; the return value is the reply to an ``ask``."""
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Release resources; runs after the mailbox is drained and the children stopped."""

    async def on_failed(self, error: BaseException) -> None:
        """Release resources after a failure that ends the actor for good: it failed (in
        :meth:`on_start` or later) and nobody restarts it, or it was cancelled. :meth:`on_stop`
        does not run then. A restart keeps what the actor holds (its next :meth:`on_start` may
        reuse it), so this is not called before one. Runs shielded, for at most
        :attr:`release_timeout` seconds."""

    #: how long :meth:`on_failed` may take
    release_timeout = 10.0

    async def _release(self, error: BaseException) -> None:
        with anyio.move_on_after(self.release_timeout, shield=True):
            try:
                await self.on_failed(error)
            except Exception as exc:  # the failure being handled is the one to report
                self.log.warning("release_failed", error=repr(exc), after=repr(unwrap_group(error)))

    async def on_child_failed(self, child: Actor[Any], error: BaseException, decision: Decision) -> Decision:
        """Called when a supervised child fails; returns the decision to apply (by default the
        one the child's policy proposes). Override to choose otherwise."""
        self.log.warning("child_failed", child=child.name, error=repr(error), decision=decision.value)
        return decision

    # -- messaging -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running``, ``stopping``, ``stopped`` or ``failed``."""
        return self._state

    async def tell(self, msg: M) -> None:
        """Queue ``msg``; waits while the mailbox is full. Raises ActorStoppedError once the actor
        stops accepting messages."""
        await self._post(_Envelope(msg, None))

    async def ask(self, msg: M, *, timeout: float | None = 60.0) -> Any:
        """Queue ``msg`` and wait for the reply, at most ``timeout`` seconds in all (queueing
        included; ``None`` waits forever). Raises TimeoutError, the handler's engine error,
        ActorFailedError if the actor crashed on it, or ActorStoppedError."""
        reply: Completion[Any] = Completion()
        with anyio.fail_after(timeout):
            await self._post(_Envelope(msg, reply))
            return await reply.wait()

    async def ask_work(self, msg: M, *, timeout: float | None = 60.0) -> Any:
        """Ask for work the actor does in a helper task (the reply is a :class:`Running`) and
        return its outcome. ``timeout`` bounds the ask only, not the work. Cancelling the caller
        cancels the work and waits until it has ended; the ask itself is shielded, so that no
        work starts with nobody waiting for it."""
        with anyio.CancelScope(shield=True):
            running: Running[Any] = await self.ask(msg, timeout=timeout)
        return await running.outcome()

    async def _post(self, env: _Envelope) -> None:
        try:
            await self._send.send(env)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorStoppedError(f"actor {self.name} is not accepting messages") from None
        depth = self._send.statistics().current_buffer_used
        if depth > self._peak:
            self._peak = depth

    def statistics(self) -> MailboxStatistics:
        s = self._send.statistics()
        return MailboxStatistics(
            depth=s.current_buffer_used,
            peak=max(self._peak, s.current_buffer_used),
            capacity=int(s.max_buffer_size),
            waiting_senders=s.tasks_waiting_send,
            received=self._received,
        )

    # -- life cycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the actor until it is stopped; report ``started`` once :meth:`on_start` is done."""
        if self._state not in ("new", "failed"):
            raise RuntimeError(f"actor {self.name} is {self._state}")
        self._done = anyio.Event()
        self._state = "starting"
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self.on_start()
                self._state = "running"
                self._started_once = True
                task_status.started(self)
                await self._serve()
                self._state = "stopping"
                await self._stop_children()
                await self._end_works()
                await self.on_stop()
                tg.cancel_scope.cancel()  # helper tasks started with start_soon end with the actor
            self._state = "stopped"
        except BaseException as exc:
            self._state = "failed"
            if self._current is not None and self._current.reply is not None:
                err = ActorFailedError(f"actor {self.name} failed: {unwrap_group(exc)!r}")
                err.__cause__ = exc
                self._current.reply.set_error(err)
            if not self._supervised:  # nobody will restart it: fail what is queued, refuse the rest
                self._reject_queued(ActorStoppedError(f"actor {self.name} failed: {unwrap_group(exc)!r}"))
            if not self._supervised or not isinstance(exc, Exception):
                # a supervisor restarts only after an Exception, and releases itself when it will not
                await self._release(exc)
            raise
        finally:
            self._current = None
            self._tg = None
            self._done.set()

    async def _serve(self) -> None:
        async for env in self._recv:
            self._received += 1
            if self._reject:
                if env.reply is not None:
                    env.reply.set_error(ActorStoppedError(f"actor {self.name} stopped before handling this"))
                continue
            self._current = env
            try:
                result = await self.handle(env.msg)
            except BlockferryError as exc:
                if env.reply is None:
                    raise
                env.reply.set_error(exc)
            else:
                if env.reply is not None:
                    env.reply.set_result(result)
            self._current = None

    def request_stop(self, *, drain: bool = True) -> None:
        """Stop accepting messages without waiting (what an actor calls to stop itself)."""
        if not drain:
            self._reject = True
        self._send.close()

    async def stop(self, *, drain: bool = True) -> None:
        """Stop accepting messages and wait until the actor has stopped.

        With ``drain`` the queued messages are handled first; without, queued asks fail with
        ActorStoppedError and queued tells are dropped. Tasks still waiting for room in the
        mailbox when ``stop`` is called get ActorStoppedError. Children are stopped after the
        mailbox, youngest first. Safe to call more than once, and on an actor that never ran.
        """
        self.request_stop(drain=drain)
        if self._done is not None and self._state in ("starting", "running", "stopping"):
            await self._done.wait()
        elif self._state in ("new", "failed"):
            self._reject_queued(ActorStoppedError(f"actor {self.name} was stopped"))
            self._state = "stopped"

    def _reject_queued(self, error: BlockferryError) -> None:
        """Fail every queued ask and close the mailbox for good."""
        self._send.close()
        while True:
            try:
                env = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if env.reply is not None:
                env.reply.set_error(error)
        self._recv.close()

    # -- children ------------------------------------------------------------------------------

    @property
    def children(self) -> tuple[Actor[Any], ...]:
        return tuple(self._children)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a helper task owned by this actor; it is cancelled when the actor stops."""
        if self._tg is None:
            raise RuntimeError(f"actor {self.name} is not running")
        self._tg.start_soon(fn, *args)

    def start_work(self, fn: Callable[[], Awaitable[T]], what: str) -> Running[T]:
        """Do ``fn`` in a helper task for an asker; reply with the returned :class:`Running`.
        Work still going when the actor stops is cancelled before :meth:`on_stop` (which may
        release what it uses)."""
        running: Running[T] = Running()
        self._works.add(running)

        async def work() -> None:
            try:
                await running.run(fn, what)
            finally:
                self._works.discard(running)

        self.start_soon(work)
        return running

    async def _end_works(self) -> None:
        for running in list(self._works):
            await running.cancel_and_wait()

    async def spawn(self, child: Actor[Any], *, policy: SupervisionPolicy | None = None) -> Any:
        """Start ``child`` in this actor's task group and wait for its start handshake.

        An error during the child's start is raised here. Returns the child.
        """
        if self._tg is None:
            raise RuntimeError(f"actor {self.name} is not running")
        self._children.append(child)
        child._supervised = True
        try:
            return await self._tg.start(self._supervise, child, policy or child.supervision)
        except BaseException:
            if child in self._children:  # _supervise may have removed it already
                self._children.remove(child)
            raise

    async def _supervise(self, child: Actor[Any], policy: SupervisionPolicy, *, task_status: TaskStatus[Any]) -> None:
        restarts = 0
        status: TaskStatus[Any] = task_status
        try:
            while True:
                try:
                    await child.run(task_status=status)
                    return
                except Exception as exc:  # cancellation is a BaseException and passes
                    if not child._started_once:  # failed before its start handshake: spawn() raises it
                        await child._release(exc)
                        raise
                    error = unwrap_group(exc)
                    decision = await self.on_child_failed(child, error, policy.decide(restarts))
                    self.child_failures.append(ChildFailure(child.name, error, decision, restarts))
                    if decision is Decision.RESTART and child._state != "stopped":  # not stopped meanwhile
                        restarts += 1
                        status = anyio.TASK_STATUS_IGNORED
                        continue
                    child._reject_queued(ActorStoppedError(f"actor {child.name} failed: {error!r}"))
                    await child._release(error)
                    if decision is not Decision.ESCALATE:
                        return
                    raise ChildFailedError(child.name, error) from error
        finally:
            if child in self._children:
                self._children.remove(child)

    async def _stop_children(self) -> None:
        for child in reversed(list(self._children)):
            await child.stop(drain=not self._reject)
