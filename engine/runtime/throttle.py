"""Bandwidth limits: a fair token bucket that data movers wait on before sending a batch.

A :class:`Throttle` allows ``rate`` bytes per second on average, with bursts of up to ``burst``
bytes. :meth:`Throttle.consume` takes the bytes at once (the balance may go negative) and sleeps
until the deficit it leaves is covered, so:

* nothing busy-waits: each caller sleeps once, for exactly as long as its bytes need;
* callers are served first come, first served: a later caller sees the deficit of every earlier
  one and sleeps longer, so tasks sharing a bucket share its rate in turn (fair between tasks
  sending batches of the same size, whatever their number of lanes);
* a caller cancelled while it sleeps gives its bytes back.

The source mover awaits every throttle in ``TaskContext.throttles`` before sending a batch (the
job's bucket, then the daemon-wide one), so a limit bounds the bytes read from sources.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import anyio
import msgspec
from blockferry.errors import ConfigError


@runtime_checkable
class BandwidthLimit(Protocol):
    """What a task's data waits on before a batch goes on (a :class:`Throttle`, or a test's gate)."""

    async def consume(self, nbytes: int) -> None: ...


class ThrottleStatistics(msgspec.Struct, frozen=True, kw_only=True):
    rate: int  #: bytes per second (0: unlimited)
    consumed: int  #: bytes let through so far
    waiting: int  #: callers sleeping now
    peak_waiting: int  #: the most callers ever sleeping at once
    waited: float  #: seconds spent sleeping, summed over callers


class Throttle:
    """A token bucket of ``rate`` bytes per second (0 or None: unlimited) and ``burst`` bytes
    (default: a tenth of a second's worth, at least 64 KiB). ``clock`` returns seconds on a
    monotonic clock (anyio's by default; injectable for tests)."""

    def __init__(self, rate: int | None, *, burst: int | None = None, name: str = "",
                 clock: Callable[[], float] = anyio.current_time) -> None:
        self.name = name
        self._clock = clock
        self._rate = 0
        self._burst = 0.0
        self._fixed_burst = burst
        self._tokens = 0.0
        self._last: float | None = None
        self._consumed = 0
        self._waiting = 0
        self._peak = 0
        self._waited = 0.0
        self.set_rate(rate)
        self._tokens = self._burst  # a new bucket starts full

    def __repr__(self) -> str:
        return f"<Throttle {self.name or '-'} {self._rate} B/s waiting={self._waiting}>"

    @property
    def rate(self) -> int:
        return self._rate

    def set_rate(self, rate: int | None) -> None:
        """Change the rate; callers already sleeping keep the wait they computed."""
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 0):
            raise ConfigError(f"a bandwidth limit is a whole number of bytes per second >= 0, not {rate!r}")
        if self._last is not None:
            self._refill(self._clock())
        self._rate = rate or 0
        self._burst = float(self._fixed_burst if self._fixed_burst is not None else max(64 << 10, self._rate // 10))
        self._tokens = min(self._tokens, self._burst)

    def _refill(self, now: float) -> None:
        if self._last is not None and self._rate:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    async def consume(self, nbytes: int) -> None:
        """Let ``nbytes`` through, sleeping first as long as the rate requires."""
        if nbytes <= 0:
            return
        self._consumed += nbytes
        if not self._rate:
            return
        self._refill(self._clock())
        self._tokens -= nbytes
        if self._tokens >= 0:
            return
        wait = -self._tokens / self._rate
        self._waiting += 1
        self._peak = max(self._peak, self._waiting)
        t0 = self._clock()
        try:
            await anyio.sleep(wait)
        except BaseException:
            # cancelled: the bytes never went through, so the next callers need not pay for them
            self._refill(self._clock())
            self._tokens = min(self._burst, self._tokens + nbytes)
            self._consumed -= nbytes
            raise
        finally:
            self._waiting -= 1
            self._waited += self._clock() - t0

    def statistics(self) -> ThrottleStatistics:
        return ThrottleStatistics(rate=self._rate, consumed=self._consumed, waiting=self._waiting,
                                  peak_waiting=self._peak, waited=self._waited)


__all__ = ["BandwidthLimit", "Throttle", "ThrottleStatistics"]
