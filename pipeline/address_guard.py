"""Which IP addresses a fetch may connect to: an explicit table, not Python's `is_global`.

    address_guard.refusal("2002:7f00:1::", allowed=())   # '6to4 (2002::/16) ...'
    address_guard.refusal("93.184.216.34", allowed=())   # None: public

`ipaddress.is_global`/`is_private` have changed between Python patch releases (6to4, Teredo,
NAT64 and the 192.0.0.0/24 block moved), so a verdict resting on them would depend on the
interpreter a worker happens to run. The tables below name every refused range.

IPv4: every special-purpose block of the IANA registry that is not globally reachable
(loopback, private, shared/CGNAT, link-local with the 169.254.169.254 metadata service,
documentation, benchmarking, multicast, reserved, broadcast, this-network).

IPv6: only global unicast (2000::/3) is allowed, minus the tunnelling and special blocks inside
it: 6to4 (2002::/16) and Teredo (2001::/32, within 2001::/23) can carry a packet to any IPv4
address, including blocked ones; documentation prefixes. Everything outside 2000::/3 is refused
(loopback, unspecified, unique-local fc00::/7, link-local fe80::/10, the deprecated site-local
fec0::/10, multicast, IPv4-compatible ::/96, discard 100::/64, local-use NAT64 64:ff9b:1::/48).
Two forms embed an IPv4 address and are judged by it: IPv4-mapped `::ffff:a.b.c.d` (the
connection goes to that IPv4 address) and NAT64 `64:ff9b::a.b.c.d` (a translator forwards to
it: refused when the IPv4 address is).

`--allow-network` CIDRs are matched against the address as resolved (and the IPv4 address of an
IPv4-mapped one), never against the IPv4 address inside a NAT64 one: allowing 127.0.0.1/32
does not allow 64:ff9b::7f00:1.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = tuple((ipaddress.IPv4Network(cidr), why) for cidr, why in (
    ("0.0.0.0/8", "'this network'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata service)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (and broadcast)"),
))
_V6_GLOBAL = ipaddress.IPv6Network("2000::/3")
_V6_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V6 = tuple((ipaddress.IPv6Network(cidr), why) for cidr, why in (
    ("2001::/32", "Teredo (2001::/32), a tunnel to any IPv4 address"),
    ("2001::/23", "IETF protocol assignments (2001::/23)"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 (2002::/16), a tunnel to any IPv4 address"),
    ("3fff::/20", "documentation"),
    ("fec0::/10", "site-local (fec0::/10, deprecated)"),
    ("fc00::/7", "unique-local (private)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("64:ff9b:1::/48", "local-use NAT64"),
))


def _v4_refusal(ip: ipaddress.IPv4Address) -> str | None:
  return next((why for network, why in _V4 if ip in network), None)


def refusal(address: str, allowed: Sequence[Network] = ()) -> str | None:
  """Why `address` (as resolved) may not be connected to, or None when it may.

  Raises:
    ValueError: `address` is not an IP address.
  """
  ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
  if isinstance(ip, ipaddress.IPv6Address) and ip in _V6_MAPPED:
    ip = ip.ipv4_mapped
  if any(ip in network for network in allowed):
    return None
  if isinstance(ip, ipaddress.IPv4Address):
    return _v4_refusal(ip)
  if ip in _V6_NAT64:
    inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    why = _v4_refusal(inner)
    return f"NAT64 (64:ff9b::/96) of {inner}, which is {why}" if why else None
  for network, why in _V6:
    if ip in network:
      return why
  return None if ip in _V6_GLOBAL else "outside IPv6 global unicast (2000::/3)"
