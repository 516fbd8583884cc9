"""Politeness towards the hosts ingest downloads from: per-host limits, back-off, opt-outs, and a
bounded set of connection pools.

    limiter = hosts.HostLimiter(per_host=8)
    async with limiter.slot("images.example.org", max_wait=60.0):   # at most 8 at once per host
      ...
    limiter.pause("images.example.org", 30.0)                 # Retry-After: everyone waits
    hosts.retry_after_seconds("Wed, 21 Oct 2026 07:28:00 GMT")
    hosts.opt_out("noai, noimageai")                          # 'noai'

One `HostLimiter` serves every download of a worker process (coroutines on the event loop of
the fetcher holding it, which is shared through Beam's `shared.Shared`), so `--max-per-host`
bounds what one worker asks of one host however many downloads are in flight. Waiting for a slot does not
count against a download's deadline (a manifest dominated by one host queues behind it); a
host paused by Retry-After for longer than a download may take fails those rows at once as
`rate_limited`, which `--retry-failed` treats as transient.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import email.utils
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable

# X-Robots-Tag directives by which publishers say "not for AI training / not for indexing".
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "none"})
# The token an X-Robots-Tag value may be scoped to ("headstart: noai").
AGENT_TOKEN = "headstart"
# Directives that carry a value after a colon, unlike a user-agent scope ("googlebot: noindex").
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                "max-video-preview"})


class HostPaused(Exception):
  """The host asked to be left alone for longer than the caller may wait."""

  def __init__(self, seconds: float):
    super().__init__(f"the host asked for a pause of {seconds:.0f}s (Retry-After)")
    self.seconds = seconds


class HostLimiter:
  """At most `per_host` requests in flight per host name, and pauses a host asked for.

  Used by the coroutines of one event loop (the fetcher's), so it needs no lock: waiting is
  for a future the release of a slot resolves, first come first served.
  """

  def __init__(self, per_host: int):
    if per_host < 1:
      raise ValueError(f"per_host must be >= 1, got {per_host!r}")
    self.per_host = per_host
    self._active: collections.Counter[str] = collections.Counter()
    self._paused_until: dict[str, float] = {}
    self._waiting: dict[str, collections.deque[asyncio.Future]] = {}

  async def acquire(self, host: str, max_wait: float) -> None:
    """Takes one of the host's slots, waiting for one; give it back with `release`.

    Raises:
      HostPaused: the host is paused for longer than `max_wait` seconds.
    """
    while True:
      pause = self._paused_until.get(host, 0.0) - time.monotonic() if self._paused_until else 0.0
      if pause > max_wait:
        raise HostPaused(pause)
      if pause <= 0 and self._active[host] < self.per_host:
        break
      if pause > 0:
        await asyncio.sleep(pause)
        continue
      turn = asyncio.get_running_loop().create_future()
      self._waiting.setdefault(host, collections.deque()).append(turn)
      try:
        await turn
      except asyncio.CancelledError:
        if turn.done() and not turn.cancelled():
          self._wake(host)  # this turn was given but not taken: pass it on
        raise
    self._active[host] += 1

  def release(self, host: str) -> None:
    """Gives back a slot `acquire` took."""
    self._active[host] -= 1
    if not self._active[host]:
      del self._active[host]
    self._wake(host)

  @contextlib.asynccontextmanager
  async def slot(self, host: str, max_wait: float) -> AsyncIterator[None]:
    """Holds one of the host's slots for the `async with` block (see `acquire`)."""
    await self.acquire(host, max_wait)
    try:
      yield
    finally:
      self.release(host)

  def _wake(self, host: str) -> None:
    waiting = self._waiting.get(host)
    if waiting is None:
      return
    while waiting:
      turn = waiting.popleft()
      if not turn.done():
        turn.set_result(None)
        break
    if not waiting:
      self._waiting.pop(host, None)

  def pause(self, host: str, seconds: float) -> None:
    """No new request to `host` starts within `seconds` (it said Retry-After)."""
    until = time.monotonic() + seconds
    if until > self._paused_until.get(host, 0.0):
      self._paused_until[host] = until

  def in_flight(self, host: str) -> int:
    """Requests to `host` in flight now."""
    return self._active[host]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
  """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date; None if absent
  or unparseable."""
  value = (value or "").strip()
  if not value:
    return None
  if value.isdigit():
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError, IndexError):
    return None
  if when.tzinfo is None:  # RFC 9110 dates are GMT
    when = when.replace(tzinfo=datetime.timezone.utc)
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_seconds(attempt: int, base: float, retry_after: float | None,
                    rng: random.Random) -> float:
  """Delay before retry number `attempt` (1, 2, ...): never sooner than Retry-After (plus up to
  25 % jitter); otherwise exponential with equal jitter, so threads that failed together do
  not come back together."""
  if retry_after is not None:
    return retry_after * rng.uniform(1.0, 1.25)
  ceiling = base * 2 ** (attempt - 1)
  return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


def opt_out(values: Iterable[str], agent: str = AGENT_TOKEN) -> str | None:
  """The opt-out directive among X-Robots-Tag header values that applies to `agent`, or None.

  A value scoped to another crawler ("googlebot: noindex") does not apply; unscoped ones and
  those scoped to `agent` do.
  """
  for value in values:
    scope = None
    for part in value.split(","):
      part = part.strip().lower()
      head, colon, rest = part.partition(":")
      if colon and head.strip() not in _VALUED_DIRECTIVES:
        scope, part = head.strip(), rest.strip()
      if scope in (None, agent) and part in OPT_OUT_DIRECTIVES:
        return part
  return None


class LruCache:
  """A thread-safe mapping of at most `capacity` entries; the least recently used goes first."""

  def __init__(self, capacity: int):
    if capacity < 1:
      raise ValueError(f"capacity must be >= 1, got {capacity!r}")
    self._capacity = capacity
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key, default=None):
    """The value of `key` (now the most recently used), or `default`."""
    with self._lock:
      if key not in self._items:
        return default
      self._items.move_to_end(key)
      return self._items[key]

  def put(self, key, value) -> None:
    """Stores `value`, dropping the least recently used entry when full."""
    with self._lock:
      self._items[key] = value
      self._items.move_to_end(key)
      if len(self._items) > self._capacity:
        self._items.popitem(last=False)


class PoolCache:
  """At most `capacity` connection pools; the least recently used one is closed to make room.

  A job over millions of URLs meets thousands of hosts: one pool each, kept for ever, would hold
  their sockets and memory to the end.
  """

  def __init__(self, capacity: int, make: Callable[[tuple], object]):
    self._capacity = capacity
    self._make = make
    self._pools: collections.OrderedDict[tuple, object] = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key: tuple):
    """The pool for `key`, made on first use."""
    with self._lock:
      pool = self._pools.get(key)
      if pool is not None:
        self._pools.move_to_end(key)
        return pool
      pool = self._pools[key] = self._make(key)
      evicted = (self._pools.popitem(last=False)[1] if len(self._pools) > self._capacity
                 else None)
    if evicted is not None:
      evicted.close()  # idle sockets close now; one still in use closes when it is released
    return pool

  def __len__(self) -> int:
    return len(self._pools)

  def close(self) -> None:
    """Closes every pool."""
    with self._lock:
      pools, self._pools = list(self._pools.values()), collections.OrderedDict()
    for pool in pools:
      pool.close()
