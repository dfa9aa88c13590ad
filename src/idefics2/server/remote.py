"""http(s) images fetched without server-side request forgery.

A request that names `http://HOST/...` makes the server open a connection of its own, from inside the
network it runs in. So every hop of a fetch is checked before anything is sent:

- the host must be on the allow-list when there is one (`example.com` exactly, or `*.example.com` for its
  subdomains);
- the host is resolved once, every address it resolves to must be a globally routable unicast address (the
  address guard: no loopback, private, link-local, shared (CGNAT), unique-local, multicast, unspecified or
  reserved address, also inside IPv4-mapped, NAT64, 6to4 and Teredo IPv6 forms), and the connection goes to
  one of those checked addresses (no second lookup that DNS rebinding could answer differently); TLS is
  verified against the host name;
- redirects are followed at most `max_redirects` times, each hop checked again, never from https to http.

The whole fetch (lookups, connections, headers and body of every hop) has one deadline, and the body is cut
at `max_bytes` as it arrives (a Content-Length above it is refused before the body). The fetch runs on the
event loop, so a server that answers slowly holds no worker thread; only the system's name lookup runs in a
thread (the standard library has no other), bounded by the resolver's own timeout.

Failures raise RemoteImageError(reason, detail): `reason` is one of REASONS (a metrics label), `detail` is
for the server's log only (it names addresses and ports, which a client must not learn).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> the addresses it resolves to

REASONS = (
    "bad_url",  # not an http(s) URL with a host, or a host or path that cannot be sent
    "domain_not_allowed",  # not on --allowed-media-domains
    "forbidden_address",  # the address guard
    "name_not_resolved",
    "connect_failed",  # refused, unreachable, reset
    "tls_failed",  # handshake or certificate
    "timeout",  # the whole fetch's deadline
    "too_many_redirects",
    "redirect_refused",  # https -> http, or to a scheme other than http(s)
    "http_status",  # neither 200 nor a redirect
    "not_an_image",  # the Content-Type is not image/*
    "too_large",
    "bad_response",  # not valid HTTP/1.1, or closed before the end
)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix: the low 32 bits are an IPv4 address
_CHECKS: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    ("unspecified", lambda a: a.is_unspecified),
    ("loopback", lambda a: a.is_loopback),
    ("link-local", lambda a: a.is_link_local),
    ("multicast", lambda a: a.is_multicast),
    ("shared address space (carrier-grade NAT)", lambda a: a in _SHARED_ADDRESS_SPACE),
    ("unique-local", lambda a: a in _UNIQUE_LOCAL),
    ("site-local", lambda a: isinstance(a, ipaddress.IPv6Address) and a.is_site_local),
    ("private", lambda a: a.is_private),
    ("reserved", lambda a: a.is_reserved),
    ("not globally routable", lambda a: not a.is_global),
)
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


class RemoteImageError(Exception):
    """A remote image that could not be used: `reason` (one of REASONS), `detail` (for the log only)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass
class RemotePolicy:
    """How http(s) image URLs are fetched (see the module's docstring)."""

    allow_private_hosts: bool = False  # the address guard off: only for a deliberate internal image store
    allowed_domains: tuple[str, ...] | None = None  # None: any host; else patterns from domain_pattern()
    max_redirects: int = 3
    deadline_s: float = 10.0  # the whole fetch, every hop included
    max_bytes: int = 20 * 2**20
    resolver: Resolver = system_resolver
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)  # verifies the host's certificate


def for_log(url: str) -> str:
    """A URL as the log shows it: no user name or password, no query (signed URLs carry secrets there)."""
    try:
        parts = urllib.parse.urlsplit(url)
        where = parts.netloc.rpartition("@")[2] + parts.path
    except ValueError:
        return repr(url[:40])
    return f"{parts.scheme}://{where}"[:160] + ("?..." if parts.query else "")


def domain_pattern(text: str) -> str:
    """An allow-list entry in its canonical form: a host name or IP address (matched exactly), or
    `*.example.com` (any subdomain of example.com, not example.com itself). ValueError when malformed."""
    value = text.strip().lower().rstrip(".")
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    try:
        value = value.encode("idna").decode("ascii") if not value.isascii() else value
    except UnicodeError:
        raise ValueError(f"not a host name: {text!r}") from None
    if len(value) > 253 or not _DOMAIN_PATTERN.fullmatch(value):
        raise ValueError(f"expected a host name, an IP address or *.domain, got {text!r}")
    return value


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Whether `host` (lower case, as in a URL) matches one of the allow-list `patterns`."""
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


def address_refusal(address: IPAddress) -> str | None:
    """Why the guard refuses to connect to `address` (a few words for the log), or None for a globally
    routable unicast address. IPv6 forms that carry an IPv4 address are judged by that address too."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = address.ipv4_mapped
        if carried is None and address in _NAT64:
            carried = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if carried is not None:  # these forms reach exactly the IPv4 address
            reason = address_refusal(carried)
            return f"{reason} ({carried} inside {address})" if reason else None
        tunnelled = [address.sixtofour] if address.sixtofour else list(address.teredo or ())
        for inner in tunnelled:
            reason = address_refusal(inner)
            if reason:
                return f"{reason} ({inner} inside {address})"
    for words, applies in _CHECKS:
        if applies(address):
            return words
    return None


async def checked_addresses(host: str, port: int, policy: RemotePolicy) -> list[IPAddress]:
    """The addresses `host` resolves to, looked up once; RemoteImageError("forbidden_address") if the guard
    is on and any of them is refused (a name that resolves to a public and a private address is refused)."""
    guarded = not policy.allow_private_hosts
    if guarded and (host == "localhost" or host.endswith(".localhost")):  # RFC 6761: always loopback
        raise RemoteImageError("forbidden_address", f"{host} is a loopback name")
    try:
        found = await policy.resolver(host, port)
        addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in found))
    except (OSError, UnicodeError, ValueError) as error:
        raise RemoteImageError("name_not_resolved", f"{host}: {error}") from None
    if not addresses:
        raise RemoteImageError("name_not_resolved", f"{host}: no address")
    for address in addresses if guarded else ():
        reason = address_refusal(address)
        if reason:
            raise RemoteImageError("forbidden_address", f"{host} resolves to {address}: {reason}")
    return addresses


async def fetch_remote(url: str, policy: RemotePolicy) -> bytes:
    """The body of an http(s) image URL, under `policy`; RemoteImageError when it cannot be used."""
    try:
        return await asyncio.wait_for(_follow(url, policy), policy.deadline_s)
    except asyncio.TimeoutError:
        detail = f"{for_log(url)}: no complete answer within {policy.deadline_s:g} s"
        raise RemoteImageError("timeout", detail) from None


@dataclass
class _Hop:
    scheme: str
    host: str  # lower case, ASCII (IDNA), no brackets, no trailing dot
    port: int
    target: str  # path and query, percent-encoded
    host_header: str
    where: str  # for the log

    @classmethod
    def parse(cls, url: str, refusal: str = "bad_url") -> _Hop:
        """RemoteImageError(refusal) unless `url` is an http(s) URL with a host."""
        try:
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in DEFAULT_PORTS:
                raise ValueError("not an http(s) URL")
            port = parts.port or DEFAULT_PORTS[scheme]
            host = (parts.hostname or "").rstrip(".")
            host = host if host.isascii() else host.encode("idna").decode("ascii")
            if not host:
                raise ValueError("no host")
        except (ValueError, UnicodeError) as error:
            raise RemoteImageError(refusal, f"{for_log(url)}: {error}") from None
        target = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=?~")
        name = f"[{host}]" if ":" in host else host
        host_header = name if port == DEFAULT_PORTS[scheme] else f"{name}:{port}"
        return cls(scheme, host, port, target, host_header, for_log(url))


async def _follow(url: str, policy: RemotePolicy) -> bytes:
    hop = _Hop.parse(url)
    for _ in range(policy.max_redirects + 1):
        if policy.allowed_domains is not None and not host_allowed(hop.host, policy.allowed_domains):
            raise RemoteImageError("domain_not_allowed", f"{hop.host} is not in --allowed-media-domains")
        addresses = await checked_addresses(hop.host, hop.port, policy)
        answer = await _get(hop, addresses, policy)
        if isinstance(answer, bytes):
            return answer
        try:
            url = urllib.parse.urljoin(url, answer)
        except ValueError:
            raise RemoteImageError("redirect_refused", f"{hop.where} redirects to {answer[:40]!r}") from None
        following = _Hop.parse(url, refusal="redirect_refused")
        if hop.scheme == "https" and following.scheme == "http":
            raise RemoteImageError("redirect_refused", f"{hop.where} redirects to {for_log(url)}")
        hop = following
    detail = f"more than {policy.max_redirects} redirects, the last to {for_log(url)}"
    raise RemoteImageError("too_many_redirects", detail)


async def _get(hop: _Hop, addresses: list[IPAddress], policy: RemotePolicy) -> bytes | str:
    """One GET to the first of `addresses` that accepts: the body, or the Location of a redirect."""
    reader, writer = await _connect(hop, addresses, policy)
    try:
        connection = h11.Connection(h11.CLIENT)
        headers = [("Host", hop.host_header), ("User-Agent", "idefics2-server"), ("Accept", "image/*"),
                   ("Connection", "close")]  # fmt: skip
        try:
            request = h11.Request(method="GET", target=hop.target, headers=headers)
        except h11.LocalProtocolError as error:
            raise RemoteImageError("bad_url", f"{hop.where}: {error}") from None
        writer.write(connection.send(request) + connection.send(h11.EndOfMessage()))
        response = await _next_event(connection, reader, hop)
        while isinstance(response, h11.InformationalResponse):
            response = await _next_event(connection, reader, hop)
        fields = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}
        status = response.status_code
        if status in REDIRECT_STATUSES and fields.get("location"):
            return fields["location"]
        if status != 200:
            raise RemoteImageError("http_status", f"{hop.where} answered {status}")
        kind = fields.get("content-type", "").partition(";")[0].strip().lower()
        if not kind.startswith("image/"):
            raise RemoteImageError("not_an_image", f"{hop.where} sent {kind or 'no type'}")
        length = fields.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_bytes:
            raise RemoteImageError("too_large", f"Content-Length {length} > {policy.max_bytes}")
        body = bytearray()
        while isinstance(event := await _next_event(connection, reader, hop), h11.Data):
            body += event.data
            if len(body) > policy.max_bytes:
                raise RemoteImageError("too_large", f"{hop.host}: more than {policy.max_bytes} bytes")
        return bytes(body)
    finally:
        writer.transport.abort()  # no graceful close to wait for: the answer is read or refused


async def _connect(hop: _Hop, addresses: list[IPAddress], policy: RemotePolicy):
    tls = policy.tls if hop.scheme == "https" else None
    failures = []
    for address in addresses:
        try:
            return await asyncio.open_connection(
                str(address), hop.port, ssl=tls, server_hostname=hop.host if tls else None,
                flags=socket.AI_NUMERICHOST,  # the checked address as it is: no lookup
            )  # fmt: skip
        except ssl.SSLError as error:  # the certificate does not vouch for the host: no other address will
            raise RemoteImageError("tls_failed", f"{hop.host} ({address}): {error}") from None
        except OSError as error:
            failures.append(f"{address}: {error.strerror or error}")
    raise RemoteImageError("connect_failed", f"{hop.host}:{hop.port}: {'; '.join(failures)}")


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader, hop: _Hop):
    """The next response event (a Response, Data or EndOfMessage), reading as much as it needs."""
    while True:
        try:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))  # b"" at the end: h11 sees it closed
                continue
        except h11.RemoteProtocolError as error:
            raise RemoteImageError("bad_response", f"{hop.host}: {error}") from None
        except OSError as error:
            raise RemoteImageError("connect_failed", f"{hop.host}: {error}") from None
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            raise RemoteImageError("bad_response", f"{hop.host}: the connection closed early")
        return event
