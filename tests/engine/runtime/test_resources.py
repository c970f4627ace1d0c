"""The in-flight budget, shared by tasks on the event loop and lane worker threads."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest
from blockferry.actors.source_mover import call_soon_from_thread
from blockferry.runtime.resources import InflightBudget

pytestmark = pytest.mark.anyio


async def test_a_task_waits_for_a_token_until_one_is_released() -> None:
    budget = InflightBudget(1)
    await budget.acquire()
    assert budget.value == 0
    got = anyio.Event()

    async def second() -> None:
        await budget.acquire()
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert not got.is_set()
        budget.release()
        await got.wait()
    assert budget.value == 0


async def test_a_thread_takes_a_token_with_a_timeout_and_gets_one_released_on_the_loop() -> None:
    budget = InflightBudget(1)
    await budget.acquire()
    assert not await anyio.to_thread.run_sync(budget.acquire_blocking, 0.01)  # none free: gives up

    async def release_soon() -> None:
        await anyio.sleep(0.05)
        budget.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_soon)
        assert await anyio.to_thread.run_sync(budget.acquire_blocking, 10.0)
    assert budget.value == 0


async def test_a_token_given_back_by_a_thread_wakes_a_task_waiting_on_the_loop() -> None:
    budget = InflightBudget(1)
    assert await anyio.to_thread.run_sync(budget.acquire_blocking, 1.0)
    post = call_soon_from_thread()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(budget.acquire)
            await anyio.wait_all_tasks_blocked()
            await anyio.to_thread.run_sync(budget.release_from_thread, post)
    assert budget.value == 0


async def test_call_soon_from_thread_runs_the_call_on_the_loop_thread() -> None:
    post = call_soon_from_thread()
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    done = anyio.Event()

    def on_loop(x: int) -> None:
        ran_on.append(threading.get_ident())
        assert x == 7
        done.set()

    await anyio.to_thread.run_sync(post, on_loop, 7)
    with anyio.fail_after(10):
        await done.wait()
    assert ran_on == [loop_thread]
