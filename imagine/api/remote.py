"""Remote media, fetched safely: an `https://` image or video a request names is fetched once by the API, without
letting a client reach what only the server can (loopback, the private network, a cloud metadata service).

Only the address policy is ours; HTTP is httpcore's (the maintained core of httpx). Per hop:
1. the URL is parsed (scheme https, or http when `allow_http`; no userinfo; a host);
2. the host is resolved ONCE (bounded in time), and every address it resolves to is checked (`check_address`): one
   refused address refuses the host, so a name cannot mix a public and a private answer;
3. the connection goes to the checked address itself (`_PinnedBackend`: no second lookup, so DNS rebinding between
   check and connect changes nothing), while the request carries the host name (`Host`, and for https the SNI and
   the certificate check against the name);
4. a redirect (at most `max_redirects`) is a new hop: parsed, resolved and checked again.
The body streams under a byte limit (an oversized `Content-Length` is refused before reading) and one deadline for the
whole fetch; its first bytes must be an accepted image or video container (sniffed, never taken from
`Content-Type`). Every failure is an `ApiError` naming the request field.

Hosts in `allow_hosts` skip the address policy (a private media server; the tests' loopback server), nothing else.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

import httpcore

from imagine.api.errors import ApiError

if TYPE_CHECKING:
    from imagine.api.intake import MediaKind
    from imagine.config import RemoteMediaConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16
SNIFF_BYTES = 12

# refused beyond what `ipaddress` flags (private, loopback, link-local, multicast, reserved, unspecified)
_EXTRA_V4 = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",  # "this network"
    "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
    "192.0.0.0/24",  # IETF protocol assignments (incl. 192.0.0.192, Oracle Cloud metadata)
    "198.18.0.0/15",  # benchmarking
    "255.255.255.255/32",
)]
_METADATA = {ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
    "fd00:ec2::254",  # AWS over IPv6
)}
_NAT64 = [ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48")]
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_TEREDO = ipaddress.ip_network("2001::/32")
_6TO4 = ipaddress.ip_network("2002::/16")
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="imagine-resolve")


def check_address(ip: IPAddress) -> str | None:
    """Why `ip` may not be fetched from (a short reason), or None when it is a globally routable unicast address.
    IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by that address."""
    if ip in _METADATA:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            reason = check_address(embedded)
            return f"an IPv6 form of {reason}" if reason else None
        if ip in _TEREDO:
            return "a Teredo address"
        if ip in _SITE_LOCAL:
            return "a site-local address"
    else:
        if any(ip in net for net in _EXTRA_V4):
            return "a reserved or shared address"
    for flag, reason in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_unspecified", "the unspecified address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(ip, flag):
            return reason
    if not ip.is_global:
        return "a non-global address"
    return None


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks)
        return ipaddress.IPv4Address(int(ip))
    return None


def is_remote(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to one checked address whatever host the request names (TLS still verifies the name)."""

    def __init__(self, address: str):
        self.address = address

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ARG002
        return super().connect_tcp(self.address, port, timeout, local_address, socket_options)


def _fail(code: str, message: str, field: str, status: int = 400) -> ApiError:
    return ApiError(status, code, f"{field}: {message}", field)


def _parse(url: str, field: str, kind: MediaKind, config: RemoteMediaConfig) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    schemes = ("https", "http") if config.allow_http else ("https",)
    if parts.scheme.lower() not in schemes:
        raise _fail(f"unsupported_{kind.noun}_url", f"only {' and '.join(s + '://' for s in schemes)} URLs are "
                    f"fetched (or send a data URI: {kind.example})", field)
    if parts.username is not None or parts.password is not None:
        raise _fail(f"invalid_{kind.noun}_url", "credentials in the URL are not accepted", field)
    if not parts.hostname:
        raise _fail(f"invalid_{kind.noun}_url", "the URL has no host", field)
    try:
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        raise _fail(f"invalid_{kind.noun}_url", "the URL has an invalid port", field) from None
    return parts


def _resolve(host: str, port: int, timeout_s: float, field: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout_s)
    except FutureTimeout:
        raise _fail("remote_fetch_failed", f"resolving {host!r} timed out", field) from None
    except OSError:
        raise _fail("remote_fetch_failed", f"the host {host!r} could not be resolved", field) from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _fail("remote_fetch_failed", f"the host {host!r} has no address", field)
    return addresses


def _sniff(head: bytes, kind: MediaKind, field: str) -> None:
    if kind.noun == "image":
        from imagine.api.intake import image_format

        ok = image_format(head) is not None
    else:
        from imagine.pipeline.media import container_format  # PyAV: loaded with the first remote video

        ok = container_format(head) is not None
    if not ok:
        raise _fail(f"invalid_{kind.noun}", f"the fetched file is not an accepted {kind.noun} (checked from its "
                    "first bytes)", field)


def fetch_media(url: str, field: str, kind: MediaKind, max_bytes: int, config: RemoteMediaConfig) -> bytes:
    """The bytes of the media at `url` (https; http when allowed), fetched under the address policy, at most
    `config.max_redirects` redirects, `max_bytes` and `config.total_timeout_s`; raises `ApiError` naming `field`:
    400 `remote_url_forbidden` (a refused address, before any connection), `remote_fetch_failed` (DNS, connect,
    TLS, timeout, an upstream error status, too many redirects), `invalid_<noun>` (not that kind of media), 413
    `<noun>_too_large`."""
    deadline = time.monotonic() + config.total_timeout_s
    allowed = {h.lower() for h in config.allow_hosts}
    for _ in range(config.max_redirects + 1):
        parts = _parse(url, field, kind, config)
        host = parts.hostname.lower()
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        addresses = _resolve(host, port, max(0.1, deadline - time.monotonic()), field)
        if host not in allowed:
            for address in addresses:
                reason = check_address(address)
                if reason is not None:
                    shown = "it is" if host == str(address) or host.strip("[]") == str(address) else "it resolves to"
                    raise _fail("remote_url_forbidden", f"{shown} {reason}, which is not fetched", field)
        status, location, body = _get(url, str(addresses[0]), field, kind, max_bytes, config, deadline)
        if status in REDIRECTS:
            if not location:
                raise _fail("remote_fetch_failed", f"upstream answered {status} without a Location", field)
            url = urllib.parse.urljoin(url, location)
            continue
        if not 200 <= status < 300:
            raise _fail("remote_fetch_failed", f"upstream answered HTTP {status}", field)
        return body
    raise _fail("remote_fetch_failed", f"more than {config.max_redirects} redirects", field)


def _get(
    url: str, address: str, field: str, kind: MediaKind, max_bytes: int, config: RemoteMediaConfig, deadline: float
) -> tuple[int, str | None, bytes]:
    """One GET to the pinned `address`: (status, Location of a redirect, the body of a 2xx)."""

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _fail("remote_fetch_failed", f"the fetch took over {config.total_timeout_s:g} s", field)
        return left

    timeouts = {"connect": min(config.connect_timeout_s, remaining()), "read": remaining(), "write": remaining(),
                "pool": remaining()}
    headers = [(b"User-Agent", config.user_agent.encode()), (b"Accept", b"*/*"), (b"Accept-Encoding", b"identity")]
    try:
        with httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(), network_backend=_PinnedBackend(address), retries=0,
            max_connections=1,
        ) as pool, pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response:
            status = response.status
            response_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            if status in REDIRECTS or not 200 <= status < 300:
                return status, response_headers.get("location"), b""
            length = response_headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _fail(f"{kind.noun}_too_large", f"the file is {int(length)} bytes, over {max_bytes}", field, 413)
            chunks, size, sniffed = [], 0, False
            for chunk in response.iter_stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _fail(f"{kind.noun}_too_large", f"the file is over {max_bytes} bytes", field, 413)
                chunks.append(chunk)
                if not sniffed and size >= SNIFF_BYTES:  # refuse a wrong file before reading all of it
                    _sniff(b"".join(chunks)[:SNIFF_BYTES], kind, field)
                    sniffed = True
                remaining()
    except httpcore.TimeoutException:
        raise _fail("remote_fetch_failed", f"the fetch took over {config.total_timeout_s:g} s", field) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, ssl.SSLError,
            httpcore.ConnectError) as e:
        raise _fail("remote_fetch_failed", f"could not fetch the URL ({type(e).__name__})", field) from None
    body = b"".join(chunks)
    if not sniffed:
        _sniff(body, kind, field)
    return status, None, body

