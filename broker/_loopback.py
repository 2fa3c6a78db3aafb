"""What counts as "this machine": loopback addresses for listeners, localhost names for Host.

Two questions, two answers. Where the broker binds or is told to bind (``http_host``, a
socket systemd passes), only an IP literal will do: a name would need resolving, and a
resolver can say anything. Where a client names the broker (the ``Host`` header), the
localhost names of RFC 6761 are accepted too, since ``curl http://localhost:8787`` is what
people type; anything else is refused there to defeat DNS rebinding.

Standard library only, no name resolution.
"""

from __future__ import annotations

import ipaddress

_MAX_PORT_DIGITS = 5


def loopback_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells if it is a loopback IP literal (127.0.0.0/8, ::1), else
    None. An IPv6 literal may be bracketed (``[::1]``); a zone id (``::1%lo``) is refused."""
    bracketed = host.startswith("[") and host.endswith("]")
    text = host[1:-1] if bracketed else host
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if bracketed and address.version != 6:
        return None
    return address if address.is_loopback else None


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` is a loopback IP literal: 127.0.0.0/8 or ::1 (also ``[::1]``)."""
    return loopback_ip(host) is not None


def split_host_port(host: str) -> str | None:
    """The name part of a ``Host`` value (``name``, ``name:port``, ``[v6]``, ``[v6]:port``),
    or None when the port part is malformed."""
    if host.startswith("["):
        end = host.find("]") + 1
        if not end:
            return None
        name, rest = host[:end], host[end:]
    else:
        name, sep, port = host.partition(":")
        rest = sep + port
    return name if not rest or _is_port(rest) else None


def _is_port(rest: str) -> bool:
    """``:`` and one to five ASCII digits."""
    digits = rest[1:]
    return (
        rest[0] == ":"
        and 0 < len(digits) <= _MAX_PORT_DIGITS
        and digits.isascii()
        and digits.isdigit()
    )


def is_localhost_name(host: str) -> bool:
    """Whether a ``Host`` header value names this machine: ``localhost``, ``*.localhost``
    or a loopback address (IPv6 bracketed), each with an optional numeric port."""
    name = split_host_port(host)
    if not name:
        return False
    if name.startswith("["):
        return is_loopback_address(name)
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback_address(name)
