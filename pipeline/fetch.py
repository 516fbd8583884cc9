"""Fetching image bytes from local paths, gs:// and http(s), with the guards the open web needs.

    fetcher = fetch.Fetcher(fetch.FetchConfig(allowed_networks=("127.0.0.1/32",)))
    data = fetcher.fetch("https://example.org/cat.jpg")   # bytes, or raises FetchError
    data = await fetcher.fetch_http(url)                  # the same, on `fetcher.loop()`

HTTP(S) downloads are coroutines on one event loop per fetcher (its own thread, started on the
first download; `http_client` speaks HTTP/1.1): hundreds in flight cost one thread, not
hundreds (issue 17). `fetch()` is the blocking form for callers on other threads; files
(local and gs://) are read on the caller's thread.

HTTP(S) guards: connect/read timeouts and a total deadline per download, a byte cap (checked on
Content-Length and while streaming), bounded retries with jittered exponential backoff for 429,
5xx and connection errors (never sooner than a Retry-After, in seconds or as an HTTP-date), and
an address guard (`address_guard`): every hop's host is resolved within the deadline and every
answer vetted, unless `allowed_networks` names it. The connection then goes to a vetted address
itself, so a second DNS answer cannot swap it (DNS rebinding); a refused connection moves on to
the next vetted address. Redirects are followed by hand, each hop vetted the same way.

Manners (`hosts`): at most `max_per_host` requests in flight per host from this process (one
`Fetcher` serves a whole worker process, see `fetch_decode.FetchDecodeFn`), a host that
answers Retry-After is paused for every download, the client names itself (`user_agent`:
headstart and its version), and a response carrying `X-Robots-Tag: noai`, `noimageai`,
`noindex` or `none` is `opted_out` (its body is not read) unless `respect_opt_out` is off.
Connection pools are bounded (`max_pools`, least recently used closed) and sized to the
requests one host may have in flight, so none is ever "full".
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import functools
import ipaddress
import itertools
import random
import socket
import ssl
import threading
import urllib.parse
import zlib
from collections.abc import Sequence

import tensorflow as tf

from contracts import layout
from pipeline import address_guard, hosts, http_client, redact, sources

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# How long a host name's vetted DNS answer is reused (seconds), and how many names are kept.
_DNS_TTL = 60.0
_DNS_NAMES = 4096
USER_AGENT = f"headstart/{layout.CODE_VERSION} (image dataset ingest)"
# Dead-letter reasons a later `--retry-failed` fetches again: the source may well answer then.
TRANSIENT_REASONS = frozenset({"timeout", "dns_timeout", "connection_error", "rate_limited",
                               "http_429"})
# Request lines (query strings and all) are logged at DEBUG: signed URLs must not reach logs.
redact.install_log_filter()


class FetchError(ValueError):
  """A source that could not be fetched; `reason` is the dead-letter code."""

  def __init__(self, reason: str, message: str, *, retryable: bool = False,
               retry_after: float | None = None):
    super().__init__(message)
    self.reason = reason
    self.retryable = retryable
    self.retry_after = retry_after


def is_transient(reason: str) -> bool:
  """True for dead-letter reasons worth fetching again later (timeouts, 429/5xx, connection)."""
  return reason in TRANSIENT_REASONS or (reason.startswith("http_5") and reason[5:].isdigit())


@dataclasses.dataclass(frozen=True)
class FetchConfig:
  """Limits of one download."""
  connect_timeout: float = 10.0
  read_timeout: float = 30.0
  deadline: float = 60.0
  max_bytes: int = 50 << 20
  retries: int = 3
  backoff: float = 0.5
  max_redirects: int = 5
  allowed_networks: tuple[str, ...] = ()
  threads: int = 16          # DNS lookups at once (getaddrinfo blocks: a thread each)
  max_per_host: int = 8      # requests in flight per host, per process
  max_pools: int = 64        # connection pools kept open (least recently used closed)
  user_agent: str = USER_AGENT
  respect_opt_out: bool = True

  @property
  def pool_size(self) -> int:
    """Connections one pool keeps: as many as requests one host may have in flight."""
    return self.max_per_host


def is_remote(location: str) -> bool:
  """True for http(s) URLs (downloaded on the event loop), False for files and gs://."""
  return location.split("://", 1)[0].lower() in sources.REMOTE_SCHEMES


def _vet(address: str, allowed: Sequence[address_guard.Network]) -> None:
  why = address_guard.refusal(address, allowed)
  if why is not None:
    raise FetchError("blocked_address", f"address {address} is {why}: not public; refused "
                     "(allow it explicitly with --allow-network)")


@functools.lru_cache(maxsize=1024)
def _header_block(netloc: str, user_agent: str, userinfo: str) -> bytes:
  """The request headers for a host (with Basic credentials from the URL's userinfo, if any),
  built once per host: a download builds none."""
  headers = {"Host": netloc, "User-Agent": user_agent, "Accept": "image/*",
             "Accept-Encoding": "identity"}
  username, _, password = userinfo.partition(":")
  if username:
    credentials = f"{urllib.parse.unquote(username)}:{urllib.parse.unquote(password)}"
    headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
  return http_client.header_block(headers)


class Fetcher:
  """Fetches bytes for any number of threads and coroutines; holds the per-host limits, the
  bounded set of connection pools (one per vetted scheme, address, port and host) and the
  event loop its downloads run on."""

  def __init__(self, config: FetchConfig):
    self.config = config
    self._allowed = tuple(ipaddress.ip_network(n, strict=False) for n in config.allowed_networks)
    self._hosts = hosts.HostLimiter(config.max_per_host)
    self._pools = hosts.PoolCache(config.max_pools, self._new_pool)
    self._dns = hosts.LruCache(_DNS_NAMES)
    self._ssl_context = ssl.create_default_context()
    self._rng = random.Random()
    # getaddrinfo has no timeout of its own: lookups run here and are waited on with a deadline.
    self._resolver = concurrent.futures.ThreadPoolExecutor(
        config.threads, thread_name_prefix="headstart-dns")
    self._loop: asyncio.AbstractEventLoop | None = None
    self._loop_thread: threading.Thread | None = None
    self._loop_lock = threading.Lock()

  def loop(self) -> asyncio.AbstractEventLoop:
    """The event loop downloads run on (its thread starts on first use)."""
    with self._loop_lock:
      if self._loop is None:
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                             name="headstart-fetch-loop")
        self._loop_thread.start()
      return self._loop

  def loop_thread_id(self) -> int | None:
    """The loop thread's id (for its CPU clock), or None before the first download."""
    return self._loop_thread.ident if self._loop_thread is not None else None

  def close(self) -> None:
    """Closes the pools, stops the event loop and the resolver threads (a lookup still
    hanging ends alone)."""
    with self._loop_lock:
      loop, thread, self._loop = self._loop, self._loop_thread, None
    if loop is not None:
      loop.call_soon_threadsafe(self._pools.close)
      loop.call_soon_threadsafe(loop.stop)
      thread.join()
      loop.close()
    self._resolver.shutdown(wait=False, cancel_futures=True)

  def fetch(self, location: str) -> bytes:
    """Returns the bytes at `location` (local path, gs:// or http(s) URL); blocks.

    Raises:
      FetchError: with a dead-letter reason code.
    """
    if is_remote(location):
      return asyncio.run_coroutine_threadsafe(self.fetch_http(location), self.loop()).result()
    return self.read_file(location)

  def read_file(self, location: str) -> bytes:
    """The bytes of a local or gs:// file.

    Raises:
      FetchError: with a dead-letter reason code.
    """
    try:
      info = tf.io.gfile.stat(location)
      if info.is_directory:
        raise FetchError("not_a_file", f"{location!r} is a directory")
      if info.length > self.config.max_bytes:
        raise FetchError("too_many_bytes",
                         f"file is {info.length} bytes; the cap is {self.config.max_bytes}")
      with tf.io.gfile.GFile(location, "rb") as f:
        return f.read()
    except tf.errors.NotFoundError:
      raise FetchError("not_found", f"file {location!r} does not exist") from None
    except tf.errors.OpError as error:  # permission denied, I/O error, bucket refused ...
      raise FetchError("unreadable", f"could not read {location!r}: {error.message}") from None

  # -- HTTP (coroutines on `loop()`) -------------------------------------------------------------

  async def fetch_http(self, url: str) -> bytes:
    """The body at an http(s) URL, with the retries, redirects and guards above.

    Raises:
      FetchError: with a dead-letter reason code.
    """
    started = asyncio.get_running_loop().time()
    for attempt in itertools.count(1):
      try:
        return await self._follow_redirects(url, started)
      except FetchError as error:
        delay = hosts.backoff_seconds(attempt, self.config.backoff, error.retry_after, self._rng)
        if (not error.retryable or attempt > self.config.retries
            or self._elapsed(started) + delay > self.config.deadline):
          raise
        await asyncio.sleep(delay)

  @staticmethod
  def _elapsed(started: float) -> float:
    return asyncio.get_running_loop().time() - started

  async def _follow_redirects(self, url: str, started: float) -> bytes:
    for _ in range(self.config.max_redirects + 1):
      parts = urllib.parse.urlsplit(url)
      host = (parts.hostname or "").lower()
      try:
        await self._hosts.acquire(host, max_wait=self.config.deadline - self._elapsed(started))
      except hosts.HostPaused as paused:
        raise FetchError("rate_limited", f"{paused}, longer than this download may take "
                         f"(--timeout {self.config.deadline:g})") from None
      try:
        result = await self._hop(url, parts, host, started)
      finally:
        self._hosts.release(host)
      if isinstance(result, bytes):
        return result
      url = result
    raise FetchError("too_many_redirects", f"more than {self.config.max_redirects} redirects")

  async def _hop(self, url: str, parts: urllib.parse.SplitResult, host: str,
                 started: float) -> bytes | str:
    """One request: the body, or the URL a redirect points to."""
    response = await self._request(parts, host, started)
    try:
      if response.status in _REDIRECT_STATUSES:
        target = response.get("Location")
        if not target:
          raise FetchError("http_error", f"redirect {response.status} without a Location")
        target = urllib.parse.urljoin(url, target)
        if urllib.parse.urlsplit(target).scheme.lower() not in sources.REMOTE_SCHEMES:
          raise FetchError("unsupported_scheme", "redirect to a non-http(s) URL refused")
        return target
      if response.status in _RETRY_STATUSES:
        retry_after = hosts.retry_after_seconds(response.get("Retry-After"))
        if retry_after is not None:
          self._hosts.pause(host, retry_after)  # every download leaves the host alone meanwhile
        raise FetchError(f"http_{response.status}", f"HTTP {response.status}", retryable=True,
                         retry_after=retry_after)
      if response.status != 200:
        reason = "not_found" if response.status in (404, 410) else f"http_{response.status}"
        raise FetchError(reason, f"HTTP {response.status}")
      directive = (hosts.opt_out(response.getlist("X-Robots-Tag"))
                   if self.config.respect_opt_out else None)
      if directive:
        raise FetchError("opted_out", f"the publisher opted out (X-Robots-Tag: {directive})")
      return await self._read_body(response, started)
    finally:
      response.release()

  def _new_pool(self, key: tuple) -> http_client.ConnectionPool:
    scheme, address, port, host = key
    return http_client.ConnectionPool(scheme, address, port, host, self.config.pool_size,
                                      self._ssl_context if scheme == "https" else None)

  async def _resolve(self, host: str, port: int, started: float) -> list[str]:
    """The host's addresses, each vetted, within the download's deadline.

    An IP literal needs no lookup; a vetted answer is kept for `_DNS_TTL` seconds (every
    connection still goes to a vetted address, and a lookup per image cost a thread hand-off).
    """
    now = asyncio.get_running_loop().time()
    cached = self._dns.get((host, port))
    if cached is not None and cached[0] > now:
      return cached[1]
    try:
      ipaddress.ip_address(host)
    except ValueError:
      pass
    else:
      _vet(host, self._allowed)
      self._dns.put((host, port), (now + _DNS_TTL, [host]))
      return [host]
    wait = min(self.config.connect_timeout, self.config.deadline - self._elapsed(started))
    lookup = self._resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
      infos = await asyncio.wait_for(asyncio.wrap_future(lookup), max(wait, 0.0))
    except TimeoutError:
      raise FetchError("dns_timeout", f"resolving the host took longer than {wait:.3g}s",
                       retryable=True) from None
    except (socket.gaierror, UnicodeError) as error:
      raise FetchError("dns_error", f"cannot resolve host: {error}", retryable=False) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:  # every answer must be public, not just the first
      _vet(address, self._allowed)
    self._dns.put((host, port), (asyncio.get_running_loop().time() + _DNS_TTL, addresses))
    return addresses

  async def _request(self, parts: urllib.parse.SplitResult, host: str,
                     started: float) -> http_client.Response:
    scheme = parts.scheme.lower()
    if not host:
      raise FetchError("bad_url", "URL has no host")
    try:
      port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as error:
      raise FetchError("bad_url", f"bad port: {error}") from None
    addresses = await self._resolve(host, port, started)
    userinfo, _, netloc = parts.netloc.rpartition("@")
    headers = _header_block(netloc, self.config.user_agent, userinfo)
    target = http_client.request_target(parts.path, parts.query)
    for index, address in enumerate(addresses):
      remaining = self.config.deadline - self._elapsed(started)
      if remaining <= 0:
        raise FetchError("timeout", f"total deadline of {self.config.deadline:g}s exceeded")
      try:
        return await self._pools.get((scheme, address, port, host)).request(
            target, headers, connect_timeout=min(self.config.connect_timeout, remaining),
            read_timeout=min(self.config.read_timeout, remaining))
      except http_client.ConnectError as error:
        # A refused or unreachable address: the host's next vetted address may serve.
        if index + 1 < len(addresses):
          continue
        raise FetchError("connection_error", redact.redact(f"cannot connect: {error}"),
                         retryable=True) from None
      except TimeoutError:
        raise FetchError("timeout", "timed out waiting for the server", retryable=True) from None
      except OSError as error:
        raise FetchError("connection_error", redact.redact(f"{type(error).__name__}: {error}"),
                         retryable=True) from None
    raise FetchError("dns_error", "the host resolved to no address")

  async def _read_body(self, response: http_client.Response, started: float) -> bytes:
    declared = response.get("Content-Length", "")
    if declared.isdigit() and int(declared) > self.config.max_bytes:
      raise FetchError("too_many_bytes", f"Content-Length {declared} exceeds the cap of "
                       f"{self.config.max_bytes} bytes")
    try:
      return await response.read_body(self.config.max_bytes, started + self.config.deadline,
                                      self.config.read_timeout)
    except http_client.BodyTooLarge:
      raise FetchError("too_many_bytes",
                       f"body exceeds the cap of {self.config.max_bytes} bytes") from None
    except http_client.DeadlineExceeded as error:
      raise FetchError("timeout", f"total deadline of {self.config.deadline:g}s exceeded "
                       f"{error}") from None
    except TimeoutError:
      raise FetchError("timeout", "read timed out", retryable=True) from None
    except (OSError, zlib.error) as error:
      raise FetchError("connection_error", f"body interrupted: {type(error).__name__}",
                       retryable=True) from None
