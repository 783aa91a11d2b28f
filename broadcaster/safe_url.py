"""URLs that subscribers give us, and the guard that keeps them pointing outside.

A subscriber webhook is a URL a stranger typed: without a guard, `serve` would POST to
whatever it names — the cloud's metadata service, an admin port on localhost, a host on
the company network (server-side request forgery). So a URL must be https, and it may
only reach public addresses, unless the operator allows a network in config:

- at registration, every address its host resolves to is checked (`check_url`);
- at send time, an IP-literal host is checked before connecting (`check_before_connect`:
  aiohttp connects to those without asking a resolver), and a name is resolved through
  `GuardedResolver`, which hands aiohttp only the addresses that pass: the address
  checked is the address connected to, so a DNS answer that changes between check and
  connect (DNS rebinding) gains nothing. Redirects are not followed (the caller passes
  `allow_redirects=False`), so a receiver cannot send us somewhere else either.

The host is read the way aiohttp reads it (`yarl`), so the host checked is the host
connected to, whatever a URL parser differential might make of an odd URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp.resolver import ThreadedResolver
from yarl import URL

from broadcaster.subscribers import InvalidSubscriberError

if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult  # a TypedDict since aiohttp 3.10

__all__ = [
    "AddressRefusedError",
    "GuardedResolver",
    "UnsafeUrlError",
    "UrlPolicy",
    "check_before_connect",
    "check_url",
    "normalise_url",
]

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_SECONDS = 10.0
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# NAT64 prefixes: 64:ff9b::a.b.c.d (RFC 6052) and the local-use 64:ff9b:1::/48 (RFC 8215)
# reach a.b.c.d through a gateway.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
# Refused whatever this Python's tables say (they differ between versions): IPv4-
# compatible and SIIT-translated forms, old site-local, and special-purpose ranges.
_NOT_PUBLIC_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in ("::/96", "::ffff:0:0:0/96", "fec0::/10", "2001::/23", "5f00::/16", "3fff::/20")
)
ALLOW_HINT = "only public addresses are called, unless the channel's allow_networks allows one"


class UnsafeUrlError(InvalidSubscriberError):
    """A URL we will not call: not https, or its host is not a public address."""


class AddressRefusedError(OSError):
    """Raised by `GuardedResolver` when every address of a host is refused: aiohttp wraps
    it in a connection error, whose cause it stays, so the caller can tell a refusal
    (permanent) from a network failure (worth a retry)."""


def normalise_url(raw: str) -> str:
    """The URL as given, if it has the form of one we could call (http(s), a host, no
    credentials before the host); UnsafeUrlError otherwise. Where it points is
    `check_url`'s business."""
    url = raw.strip()
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrlError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() for c in url):
        raise UnsafeUrlError("webhook URL must not contain spaces")
    if "\\" in url:
        # Browsers read a backslash as a slash, Python's parser does not: refused rather
        # than guessed (two parsers, two hosts).
        raise UnsafeUrlError("webhook URL must not contain a backslash")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        URL(url)  # what aiohttp will parse it with
    except ValueError:
        raise UnsafeUrlError("webhook URL is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrlError("webhook URL must start with https:// and name a host")
    if "@" in parts.netloc:
        raise UnsafeUrlError(
            "webhook URL must not carry a user and password before the host "
            "(put a token in the path or query)"
        )
    return url


def url_host(url: str) -> str:
    """The host aiohttp will connect to for this URL (IDNA-encoded, IPv6 without
    brackets); UnsafeUrlError when there is none, or when it has an IPv6 zone id (which
    the socket layer would resolve past our checks; a public URL never needs one)."""
    try:
        host = URL(url).raw_host
    except ValueError:
        host = None
    if not host:
        raise UnsafeUrlError("webhook URL is not a URL with a host")
    if "%" in host:
        raise UnsafeUrlError("webhook URL: an IPv6 zone id (%…) is not allowed")
    return host


def literal_address(host: str) -> IpAddress | None:
    """The address an IP-literal host names; None for a name.

    aiohttp connects to a host it takes for an IP literal (digits and dots, or a colon)
    without asking the resolver, so such a host must be an address we can check:
    `127.1`, `2130706433` or `0177.0.0.1` — which the socket layer maps onto 127.0.0.1 —
    are refused rather than passed over."""
    if ":" not in host and not host.replace(".", "").isdigit():
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise UnsafeUrlError(f"webhook URL: '{host}' is not a canonical IP address") from None


def _embedded_ipv4(ip: IpAddress) -> IpAddress:
    """The IPv4 address an IPv6 address stands for, where it stands for one: mapped
    (::ffff:127.0.0.1 is 127.0.0.1 to a dual-stack socket), NAT64 or 6to4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if any(ip in prefix for prefix in _NAT64):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


@dataclass(frozen=True)
class UrlPolicy:
    """Where subscriber URLs may point: public addresses over https, plus the networks
    the operator allows (a partner on the company network, the local simulators)."""

    allow_networks: Sequence[IpNetwork] = field(default_factory=tuple)
    allow_http: bool = False

    def refusal(self, address: str) -> str | None:
        """Why this IP address may not be called ("127.0.0.1 (a loopback address)"), or
        None when it may."""
        try:
            given: IpAddress = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address} is not an IP address"
        ip = _embedded_ipv4(given)
        if any(a in network for network in self.allow_networks for a in (given, ip)):
            return None
        if isinstance(given, ipaddress.IPv6Address) and given.ipv4_mapped is not None:
            kind = _public(ip)  # one address written two ways
        else:  # a NAT64 or 6to4 address is public only if what it reaches is
            kind = _public(given) or _public(ip)
        if kind is None:
            return None
        return f"{given} ({ip}, {kind})" if given != ip else f"{ip} ({kind})"

    def kind_refused(self, address: str) -> str | None:
        """What kind of address this is when it is refused ("a private address"), without
        the address itself; None when it may be called."""
        if self.refusal(address) is None:
            return None
        try:
            ip = _embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return "not an IP address"
        return _public(ip) or _public(ipaddress.ip_address(address.split("%", 1)[0]))

    def check_scheme(self, url: str) -> None:
        """UnsafeUrlError unless the URL's scheme is allowed (https; http too with
        `allow_http`)."""
        allowed = ("https", "http") if self.allow_http else ("https",)
        if urlsplit(url).scheme not in allowed:
            raise UnsafeUrlError("webhook URL must be https://")


def _public(ip: IpAddress) -> str | None:
    """None for a public unicast address; else what it is, as an error says it."""
    reserved = isinstance(ip, ipaddress.IPv6Address) and any(ip in n for n in _NOT_PUBLIC_V6)
    if ip.is_global and not ip.is_multicast and not reserved:
        return None
    if ip.is_unspecified:
        return "an unspecified address (this host)"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    return "not a public address"


def check_before_connect(url: str, policy: UrlPolicy) -> str:
    """What is checked right before each request: the scheme, and an IP-literal host
    (a name is checked by `GuardedResolver` as it is resolved). The host, or
    UnsafeUrlError."""
    policy.check_scheme(url)
    host = url_host(url)
    address = literal_address(host)
    if address is not None:
        reason = policy.refusal(str(address))
        if reason is not None:
            raise UnsafeUrlError(f"webhook URL: {reason} is refused — {ALLOW_HINT}")
    return host


async def check_url(url: str, policy: UrlPolicy) -> None:
    """Refuse (UnsafeUrlError) a URL that is not https, whose host does not resolve, or
    resolves — even to one of several addresses — to one the policy refuses."""
    url = normalise_url(url)
    host = check_before_connect(url, policy)
    if literal_address(host) is not None:
        return
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, URL(url).port, type=socket.SOCK_STREAM
            )
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)):
            raise UnsafeUrlError(
                f"webhook URL: host '{host}' could not be looked up just now (DNS did not "
                "answer) — try again in a moment"
            ) from None
        raise UnsafeUrlError(f"webhook URL: host '{host}' does not resolve") from None
    except (OSError, UnicodeError):
        raise UnsafeUrlError(f"webhook URL: host '{host}' does not resolve") from None
    except TimeoutError:
        raise UnsafeUrlError(
            f"webhook URL: looking up host '{host}' took over {RESOLVE_TIMEOUT_SECONDS:.0f} s "
            "— try again in a moment"
        ) from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise UnsafeUrlError(f"webhook URL: host '{host}' does not resolve")
    for address in addresses:
        kind = policy.kind_refused(address)
        if kind is not None:
            # The kind only, not the address: an answer must not map the inside network.
            raise UnsafeUrlError(f"webhook URL: host '{host}' resolves to {kind} — {ALLOW_HINT}")


class GuardedResolver(ThreadedResolver):
    """aiohttp's threaded resolver, keeping only the addresses the policy allows; none
    left is an `AddressRefusedError` naming the refusal. Pair it with
    `check_before_connect` for IP-literal hosts, which aiohttp connects to without
    asking the resolver."""

    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__()
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        allowed = [r for r in found if self.policy.refusal(r["host"]) is None]
        if not allowed:
            kinds = {self.policy.kind_refused(f["host"]) for f in found}
            refused = "; ".join(sorted(k for k in kinds if k))
            raise AddressRefusedError(f"host '{host}' resolves to {refused}")
        return allowed
