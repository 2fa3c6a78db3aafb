"""broker._metrics: what /metrics exposes, on a registry of its own, with bounded labels."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker._metrics import MAX_LABEL_SETS, Metrics
from broker._status import ProfileStatus


def _samples(metrics: Metrics) -> list[Sample]:
    return [s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples]


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    for s in _samples(metrics):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def _status(profile: str, state: str, valid: bool, expires_in: float | None) -> ProfileStatus:
    return ProfileStatus(
        profile, "acct", state, valid, None, expires_in, None, None, None, None, None
    )


def test_engine_observations() -> None:
    """Refreshes, upstream latency and statuses, 429s and coalesced waiters are exposed."""
    m = Metrics()
    m.observe_refresh("default", "ok")
    m.observe_refresh("default", "ok")
    m.observe_upstream("default", 0.3, 200)
    m.observe_upstream("default", 10.0, None)
    m.observe_throttled("acct")
    m.observe_coalesced("default", 7)
    assert _value(m, "colt_broker_refreshes_total", profile="default", outcome="ok") == 2
    assert _value(m, "colt_broker_upstream_request_seconds_count", profile="default") == 2
    assert (
        _value(m, "colt_broker_upstream_request_seconds_bucket", profile="default", le="0.5") == 1
    )
    assert _value(m, "colt_broker_upstream_responses_total", status="none") == 1
    assert _value(m, "colt_broker_throttled_total", account="acct") == 1
    assert _value(m, "colt_broker_refresh_waiters_sum", profile="default") == 7


def test_requests_and_peers() -> None:
    """Served requests are counted by profile, transport and status; peers by uid and gid."""
    m = Metrics()
    for _ in range(3):
        m.observe_request("default", "unix", 200)
    m.observe_request("_unknown", "tcp", 404)
    m.observe_peer(1000, 100)
    assert (
        _value(
            m, "colt_broker_http_requests_total", profile="default", transport="unix", status="200"
        )
        == 3
    )
    assert _value(m, "colt_broker_http_requests_total", profile="_unknown", status="404") == 1
    assert _value(m, "colt_broker_peer_connections_total", uid="1000", gid="100") == 1


def test_label_sets_are_bounded() -> None:
    """Past the cap, new label sets fold into "_other" instead of growing without end."""
    m = Metrics()
    for i in range(MAX_LABEL_SETS + 50):
        m.observe_peer(i, 0)
    assert len(m.peers) == MAX_LABEL_SETS + 1
    assert _value(m, "colt_broker_peer_connections_total", uid="_other") == 50


def test_token_state_is_read_at_scrape_time() -> None:
    """Token expiry, validity and state come from the bound status function at each scrape."""
    m = Metrics()
    statuses = [_status("default", "fresh", True, 1500.5), _status("other", "failed", False, None)]
    m.bind_status(lambda: statuses)
    assert _value(m, "colt_broker_token_expires_in_seconds", profile="default") == 1500.5
    assert _value(m, "colt_broker_token_expires_in_seconds", profile="other") is None
    assert _value(m, "colt_broker_token_valid", profile="other") == 0
    assert _value(m, "colt_broker_profile_state", profile="other", state="failed") == 1
    assert _value(m, "colt_broker_profile_state", profile="other", state="fresh") == 0
    statuses[0] = _status("default", "stale", True, 100.0)
    assert _value(m, "colt_broker_token_expires_in_seconds", profile="default") == 100.0


def test_own_registry() -> None:
    """Two Metrics never clash, and nothing lands in prometheus-client's global registry."""
    a, b = Metrics(), Metrics()
    a.observe_refresh("p", "ok")
    assert _value(b, "colt_broker_refreshes_total", profile="p") is None
    assert (
        REGISTRY.get_sample_value("colt_broker_refreshes_total", {"profile": "p", "outcome": "ok"})
        is None
    )
