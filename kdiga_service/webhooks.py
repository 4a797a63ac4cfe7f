"""Webhooks on the wire: the URL policy (SSRF), the signature, and one HTTP delivery.

The signature follows the scheme of the most widely used senders (Stripe; Standard Webhooks is the
same idea): each request carries

    Kdiga-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

with one more `v1=` while a rotated-out secret is still valid. A receiver recomputes the HMAC over
the raw bytes it received with its secret, compares in constant time against any `v1`, and refuses
a timestamp more than `REPLAY_TOLERANCE_S` from its clock (a captured request cannot be replayed
later); `Kdiga-Event-Id` is stable across retries, so a receiver can also drop duplicates
(delivery is at least once).

URLs are checked twice: when a job names one (`check_url`), and again before each delivery on the
addresses the name resolves to *then* (`deliver`), and the request is sent to that checked address
(the Host header and TLS name stay the URL's), so a name that later resolves to a private address
(DNS rebinding) reaches nothing. Redirects are never followed: a 3xx is a failed attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from kdiga_service.settings import Settings

REPLAY_TOLERANCE_S = 300
SIGNATURE_HEADER = "Kdiga-Signature"
SECRET_PREFIX = "whsec_"
USER_AGENT = "kdiga-webhooks/1"
EXCERPT_BYTES = 512
MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

# Cloud metadata services: refused even inside an allowed CIDR, unless listed as that one address.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"))


class UrlRefused(ValueError):
    """A webhook URL the policy does not allow; the message is one sentence for the caller."""


# -- signing ---------------------------------------------------------------------------------------
def new_secret() -> str:
    """A new signing secret, `whsec_` + 32 random bytes (url-safe base64)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `"<timestamp>." + body` keyed with the whole secret string."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets_: Sequence[str], body: bytes, timestamp: int | None = None) -> str:
    """`t=<timestamp>,v1=<sig>[,v1=<sig>...]`, one `v1` per valid secret (newest first)."""
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}"] + [f"v1={signature(s, t, body)}" for s in secrets_])


def verify_signature(secret: str, body: bytes, header: str, *, tolerance_s: int = REPLAY_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """True when `header` holds a `v1` of `body` under `secret` with a timestamp inside the window."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k.strip() == "t"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit():
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = signature(secret, t, body)
    return any(hmac.compare_digest(expected, v.strip()) for k, v in parts if k.strip() == "v1")


# -- the URL policy --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlPolicy:
    """Where webhooks may go: the operator's allowed names and networks, and public addresses."""

    networks: tuple[Network, ...] = ()
    names: tuple[str, ...] = ()
    allow_public: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlPolicy:
        networks, names = [], []
        for entry in settings.webhook_allowed_hosts:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.append(entry.lower().rstrip("."))
        return cls(tuple(networks), tuple(names), settings.webhook_allow_public)

    def name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == n or (n.startswith("*.") and host.endswith(n[1:])) for n in self.names)

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """Why `address` (what `host` resolved to) may not be sent to, or None when it may."""
        if address in METADATA_ADDRESSES:
            if any(net.num_addresses == 1 and address in net for net in self.networks):
                return None
            return f"The webhook URL's host '{host}' is a cloud metadata address ({address}); it is never allowed."
        if self.name_allowed(host) or any(address in net for net in self.networks):
            return None
        if not address.is_global:
            return (f"The webhook URL's host '{host}' is a private, loopback or reserved address ({address}); "
                    "the operator must allow it in KDIGA_WEBHOOK_ALLOWED_HOSTS first.")
        if not self.allow_public:
            return (f"The webhook URL's host '{host}' is not in this service's allow-list of webhook hosts "
                    "(KDIGA_WEBHOOK_ALLOWED_HOSTS).")
        return None


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to now (a literal address resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts, and the addresses it resolved to (all of them allowed)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def _plain(address: str) -> IPAddress:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return ip


def _split(url: str) -> tuple[str, str, int]:
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"The webhook URL is longer than {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("The webhook URL is not a valid URL.") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("The webhook URL must start with http:// or https://.")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("The webhook URL must not contain a user name or password; requests are signed instead.")
    if not parts.hostname:
        raise UrlRefused("The webhook URL has no host.")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_url(url: str, policy: UrlPolicy, resolve: Resolver = resolve_host) -> Target:
    """The URL as a Target when every address its host resolves to is allowed, else UrlRefused."""
    scheme, host, port = _split(url)
    try:
        found = resolve(host, port)
    except (OSError, UnicodeError):
        raise UrlRefused(f"The webhook URL's host '{host}' could not be resolved.") from None
    if not found:
        raise UrlRefused(f"The webhook URL's host '{host}' could not be resolved.")
    addresses = tuple(_plain(a) for a in found)
    for address in addresses:
        if why := policy.refusal(host, address):
            raise UrlRefused(why)
    return Target(url, scheme, host, port, addresses)


# -- one delivery ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """What one POST did: the status code (None when no answer), whether it counts as delivered."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    excerpt: str | None = None
    duration_ms: float = 0.0


def _pinned_url(target: Target, address: IPAddress) -> str:
    parts = urlsplit(target.url)
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def _host_header(target: Target) -> str:
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


def deliver(url: str, body: bytes, headers: dict[str, str], *, policy: UrlPolicy, timeout_s: float,
            resolve: Resolver = resolve_host) -> Attempt:
    """POST `body` to `url` once: re-check its addresses now, connect to the checked one, no redirects."""
    started = time.monotonic()
    try:
        target = check_url(url, policy, resolve)
    except UrlRefused as exc:
        return Attempt(ok=False, error=str(exc))
    address = target.addresses[0]
    send_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers,
                    "Host": _host_header(target)}
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client, client.stream(
            "POST", _pinned_url(target, address), content=body, headers=send_headers,
            extensions={"sni_hostname": target.host},
        ) as response:
            excerpt = _read_excerpt(response)
    except httpx.HTTPError as exc:
        took = (time.monotonic() - started) * 1000
        return Attempt(ok=False, error=f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__, duration_ms=took)
    took = (time.monotonic() - started) * 1000
    code = response.status_code
    if 200 <= code < 300:
        return Attempt(ok=True, status_code=code, excerpt=excerpt, duration_ms=took)
    if 300 <= code < 400:
        where = response.headers.get("location", "")[:200]
        error = f"The receiver answered {code} (a redirect to '{where}'); webhooks do not follow redirects."
    else:
        error = f"The receiver answered {code}."
    return Attempt(ok=False, status_code=code, error=error, excerpt=excerpt, duration_ms=took)


def _read_excerpt(response: httpx.Response) -> str:
    """The first bytes of the answer (kept for the deliveries log), without reading a huge body."""
    data = b""
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= EXCERPT_BYTES:
            break
    return data[:EXCERPT_BYTES].decode("utf-8", "replace")
