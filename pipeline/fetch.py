"""Fetching image bytes from local paths, gs:// and http(s), with the guards the open web needs.

    fetcher = fetch.Fetcher(fetch.FetchConfig(allowed_networks=("127.0.0.1/32",)))
    data = fetcher.fetch("https://example.org/cat.jpg")   # bytes, or raises FetchError

HTTP(S) guards: connect/read timeouts and a total deadline per download, a byte cap (checked on
Content-Length and while streaming), bounded retries with jittered exponential backoff for 429,
5xx and connection errors (never sooner than a Retry-After, in seconds or as an HTTP-date), and
an address guard (`address_guard`): every hop's host is resolved within the deadline and every
answer vetted, unless `allowed_networks` names it. The connection then goes to a vetted address
itself, so a second DNS answer cannot swap it (DNS rebinding); a refused connection moves on to
the next vetted address. Redirects are followed by hand, each hop vetted the same way.

Manners (`hosts`): at most `max_per_host` requests in flight per host from this process (one
`Fetcher` serves all of a worker's threads, see `transforms.FetchDecodeBatchFn`), a host that
answers Retry-After is paused for every thread, the client names itself (`user_agent`:
headstart and its version), and a response carrying `X-Robots-Tag: noai`, `noimageai`,
`noindex` or `none` is `opted_out` (its body is not read) unless `respect_opt_out` is off.
Connection pools are bounded (`max_pools`, least recently used closed) and sized to the
requests one host may have in flight, so none is ever "full".
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import ipaddress
import itertools
import random
import socket
import ssl
import time
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
  threads: int = 16          # downloads in flight in one process (sizes the DNS pool)
  max_per_host: int = 8      # requests in flight per host, per process
  max_pools: int = 64        # connection pools kept open (least recently used closed)
  user_agent: str = USER_AGENT
  respect_opt_out: bool = True

  @property
  def pool_size(self) -> int:
    """Connections one pool keeps: as many as requests one host may have in flight."""
    return min(self.threads, self.max_per_host)


def _vet(address: str, allowed: Sequence[address_guard.Network]) -> None:
  why = address_guard.refusal(address, allowed)
  if why is not None:
    raise FetchError("blocked_address", f"address {address} is {why}: not public; refused "
                     "(allow it explicitly with --allow-network)")


class Fetcher:
  """Fetches bytes for any number of threads; holds the per-host limits and the bounded set of
  connection pools (one per vetted scheme, address, port and host)."""

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

  def close(self) -> None:
    """Closes the pools and stops the resolver threads (a lookup still hanging ends alone)."""
    self._pools.close()
    self._resolver.shutdown(wait=False, cancel_futures=True)

  def fetch(self, location: str) -> bytes:
    """Returns the bytes at `location` (local path, gs:// or http(s) URL).

    Raises:
      FetchError: with a dead-letter reason code.
    """
    if location.split("://", 1)[0].lower() in sources.REMOTE_SCHEMES:
      return self._fetch_http(location)
    return self._fetch_file(location)

  def _fetch_file(self, location: str) -> bytes:
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

  # -- HTTP --------------------------------------------------------------------------------------

  def _fetch_http(self, url: str) -> bytes:
    started = time.monotonic()
    for attempt in itertools.count(1):
      try:
        return self._follow_redirects(url, started)
      except FetchError as error:
        delay = hosts.backoff_seconds(attempt, self.config.backoff, error.retry_after, self._rng)
        if (not error.retryable or attempt > self.config.retries
            or time.monotonic() - started + delay > self.config.deadline):
          raise
        time.sleep(delay)

  def _follow_redirects(self, url: str, started: float) -> bytes:
    for _ in range(self.config.max_redirects + 1):
      parts = urllib.parse.urlsplit(url)
      host = (parts.hostname or "").lower()
      try:
        with self._hosts.slot(host, max_wait=self.config.deadline - (time.monotonic() - started)):
          result = self._hop(url, parts, host, started)
      except hosts.HostPaused as paused:
        raise FetchError("rate_limited", f"{paused}, longer than this download may take "
                         f"(--timeout {self.config.deadline:g})") from None
      if isinstance(result, bytes):
        return result
      url = result
    raise FetchError("too_many_redirects", f"more than {self.config.max_redirects} redirects")

  def _hop(self, url: str, parts: urllib.parse.SplitResult, host: str,
           started: float) -> bytes | str:
    """One request: the body, or the URL a redirect points to."""
    response = self._request(parts, host, started)
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
          self._hosts.pause(host, retry_after)  # every thread leaves the host alone meanwhile
        raise FetchError(f"http_{response.status}", f"HTTP {response.status}", retryable=True,
                         retry_after=retry_after)
      if response.status != 200:
        reason = "not_found" if response.status in (404, 410) else f"http_{response.status}"
        raise FetchError(reason, f"HTTP {response.status}")
      directive = (hosts.opt_out(response.getlist("X-Robots-Tag"))
                   if self.config.respect_opt_out else None)
      if directive:
        raise FetchError("opted_out", f"the publisher opted out (X-Robots-Tag: {directive})")
      return self._read_body(response, started)
    finally:
      response.release()

  def _new_pool(self, key: tuple) -> http_client.ConnectionPool:
    scheme, address, port, host = key
    return http_client.ConnectionPool(scheme, address, port, host, self.config.pool_size,
                                      self._ssl_context if scheme == "https" else None)

  def _resolve(self, host: str, port: int, started: float) -> list[str]:
    """The host's addresses, each vetted, within the download's deadline.

    An IP literal needs no lookup; a vetted answer is kept for `_DNS_TTL` seconds (every
    connection still goes to a vetted address, and a lookup per image cost a thread hand-off).
    """
    cached = self._dns.get((host, port))
    if cached is not None and cached[0] > time.monotonic():
      return cached[1]
    try:
      ipaddress.ip_address(host)
    except ValueError:
      pass
    else:
      _vet(host, self._allowed)
      self._dns.put((host, port), (time.monotonic() + _DNS_TTL, [host]))
      return [host]
    wait = min(self.config.connect_timeout, self.config.deadline - (time.monotonic() - started))
    lookup = self._resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
      infos = lookup.result(timeout=max(wait, 0.0))
    except concurrent.futures.TimeoutError:
      lookup.cancel()
      raise FetchError("dns_timeout", f"resolving the host took longer than {wait:.3g}s",
                       retryable=True) from None
    except (socket.gaierror, UnicodeError) as error:
      raise FetchError("dns_error", f"cannot resolve host: {error}", retryable=False) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:  # every answer must be public, not just the first
      _vet(address, self._allowed)
    self._dns.put((host, port), (time.monotonic() + _DNS_TTL, addresses))
    return addresses

  def _request(self, parts: urllib.parse.SplitResult, host: str,
               started: float) -> http_client.Response:
    scheme = parts.scheme.lower()
    if not host:
      raise FetchError("bad_url", "URL has no host")
    try:
      port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as error:
      raise FetchError("bad_url", f"bad port: {error}") from None
    addresses = self._resolve(host, port, started)
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": self.config.user_agent,
               "Accept": "image/*", "Accept-Encoding": "identity"}
    if parts.username:
      credentials = (f"{urllib.parse.unquote(parts.username)}:"
                     f"{urllib.parse.unquote(parts.password or '')}")
      headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    target = http_client.request_target(parts.path, parts.query)
    for index, address in enumerate(addresses):
      remaining = self.config.deadline - (time.monotonic() - started)
      if remaining <= 0:
        raise FetchError("timeout", f"total deadline of {self.config.deadline:g}s exceeded")
      try:
        return self._pools.get((scheme, address, port, host)).request(
            target, headers, connect_timeout=min(self.config.connect_timeout, remaining),
            read_timeout=min(self.config.read_timeout, remaining))
      except http_client.ConnectError as error:
        # A refused or unreachable address: the host's next vetted address may serve.
        if index + 1 < len(addresses):
          continue
        raise FetchError("connection_error", redact.redact(f"cannot connect: {error}"),
                         retryable=True) from None
      except TimeoutError as error:
        raise FetchError("timeout", f"timed out: {error or type(error).__name__}",
                         retryable=True) from None
      except OSError as error:
        raise FetchError("connection_error", redact.redact(f"{type(error).__name__}: {error}"),
                         retryable=True) from None
    raise FetchError("dns_error", "the host resolved to no address")

  def _read_body(self, response: http_client.Response, started: float) -> bytes:
    declared = response.get("Content-Length", "")
    if declared.isdigit() and int(declared) > self.config.max_bytes:
      raise FetchError("too_many_bytes", f"Content-Length {declared} exceeds the cap of "
                       f"{self.config.max_bytes} bytes")
    try:
      return response.read_body(self.config.max_bytes, started + self.config.deadline,
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
