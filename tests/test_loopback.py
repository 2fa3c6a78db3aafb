"""Loopback addresses (where the broker binds) and localhost names (what Host may say)."""

from __future__ import annotations

import pytest

from broker._loopback import is_localhost_name, is_loopback_address, loopback_ip


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
        ("localhost", False), ("LOCALHOST", False), ("0.0.0.0", False), ("::", False),
        ("192.168.1.10", False), ("example.com", False), ("", False), ("[127.0.0.1]", False),
        ("::1%lo", False), ("[::1%lo]", False), ("::ffff:127.0.0.1", False), ("127.1", False),
        ("[::1", False), ("::1]", False),
    ],
)  # fmt: skip
def test_is_loopback_address(host: str, ok: bool) -> None:
    """Only IP literals in 127.0.0.0/8 or ::1 are loopback addresses; names never are."""
    assert is_loopback_address(host) is ok


def test_loopback_ip_strips_brackets() -> None:
    """A bracketed IPv6 literal yields the bare address, ready for bind()."""
    assert str(loopback_ip("[::1]")) == "::1"
    assert str(loopback_ip("127.0.0.1")) == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("localhost", True), ("LocalHost:80", True), ("localhost.", True), ("127.0.0.1", True),
        ("127.0.0.2:8787", True), ("[::1]", True), ("[::1]:1", True), ("a.b.localhost:9", True),
        ("evil.com", False), ("localhost.evil.com", False), ("127.0.0.1.nip.io", False),
        ("::1", False), ("[::1", False), ("localhost:abc", False), ("localhost:123456", False),
        ("localhost:", False), ("localhost:\u00b2", False), ("", False), ("0.0.0.0", False),
        ("[::2]", False), ("localhostx", False), ("[127.0.0.1]", False), ("[::1]x", False),
    ],
)  # fmt: skip
def test_is_localhost_name(host: str, ok: bool) -> None:
    """A Host value passes only as localhost, *.localhost or a loopback address, with an
    optional numeric port."""
    assert is_localhost_name(host) is ok
