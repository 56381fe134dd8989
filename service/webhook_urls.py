"""Where a webhook may send: an http(s) URL without credentials whose host resolves only to global
addresses, unless DPO_WEBHOOK_ALLOW_PRIVATE lets it reach loopback, private, link-local and other
non-global ones. Checked when a webhook is created, and again before every attempt on the very address
the attempt then connects to: a name that resolved to a public address at creation may resolve to
127.0.0.1 or 169.254.169.254 later (DNS rebinding)."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart: what to connect to, and what to tell the server (Host, TLS name)."""

    scheme: str
    host: str  # ASCII (IDNA) host name, or an IP address without brackets
    port: int
    path: str  # path and query, at least "/"
    host_header: str  # host[:port] as the URL gives it

    @property
    def host_is_ip(self) -> bool:
        return _ip(self.host) is not None

    def pinned_url(self, address: IPAddress) -> str:
        """The URL with its host replaced by `address`: connecting there, and nowhere a second lookup
        might lead."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def parse(url: str) -> Target:
    """The URL's parts; InvalidInput (param `url`) for anything but http(s) with a host and no credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise _refused(f"the webhook URL is not a valid URL ({err})", "webhook_url_invalid") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise _refused("a webhook URL must start with https:// (or http://)", "webhook_url_scheme")
    if parts.username is not None or parts.password is not None:
        raise _refused("a webhook URL must not hold a user name or password; authenticate deliveries by their "
                       "signature instead", "webhook_url_credentials")
    if not parts.hostname:
        raise _refused("the webhook URL has no host", "webhook_url_invalid")
    try:
        host = parts.hostname if _ip(parts.hostname) else parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise _refused(f"the webhook URL's host {parts.hostname!r} is not a valid host name",
                       "webhook_url_invalid") from None
    shown = f"[{host}]" if ":" in host else host
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], path,
                  f"{shown}:{port}" if port else shown)


def resolve(target: Target, allow_private: bool) -> list[IPAddress]:
    """Every address the target's host resolves to, all checked (InvalidInput when any is refused)."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise _refused(f"the webhook URL's host {target.host!r} does not resolve ({err})",
                       "webhook_url_unresolvable") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not allow_private:
        for address in addresses:
            if (why := refusal(address)) is not None:
                # The address itself is not shown: a team learns nothing of the service's network from it.
                raise _refused(f"the webhook URL's host {target.host!r} resolves to a {why} address; webhooks "
                               "may only reach public addresses (the operator may allow others with "
                               "DPO_WEBHOOK_ALLOW_PRIVATE=1)", "webhook_url_private_address")
    return addresses


def check(url: str, allow_private: bool) -> Target:
    """`url` as a webhook may use it (parse, then resolve); InvalidInput naming why not."""
    target = parse(url)
    resolve(target, allow_private)
    return target


def refusal(address: IPAddress) -> str | None:
    """Why a webhook may not reach `address` (a word for the message), or None for a public address."""
    if address.version == 6 and address.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        address = address.ipv4_mapped
    for why, bad in (("loopback", address.is_loopback), ("unspecified", address.is_unspecified),
                     ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                     ("private", address.is_private), ("reserved", address.is_reserved)):
        if bad:
            return why
    return None if address.is_global else "non-global"


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refused(message: str, code: str) -> InvalidInput:
    return InvalidInput(message, param="url", code=code)
