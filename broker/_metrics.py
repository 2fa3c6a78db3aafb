"""Prometheus metrics, on a registry of their own (never the process-global one).

Per-request counters sit on the serving hot path, so they are plain dict increments that a
custom collector turns into samples at scrape time; refresh-side metrics (a few a minute) use
prometheus-client's own Counter and Histogram. Token state is read from the engine's status
at scrape time, so it is never stale. Every label set is bounded: profiles come from the
configuration (unknown names are counted as ``_unknown``), and past a cap new label sets fold
into ``_other``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker._status import ProfileStatus

PREFIX = "colt_broker"
STATES = ("empty", "fresh", "refreshing", "stale", "expired", "failed")
UNKNOWN_PROFILE, NO_PROFILE, OTHER = "_unknown", "_none", "_other"
MAX_LABEL_SETS = 1024
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StatusFn = Callable[[], list[ProfileStatus]]


def _bump(
    counts: dict[tuple[object, ...], int], key: tuple[object, ...], other: tuple[object, ...]
) -> None:
    if key not in counts and len(counts) >= MAX_LABEL_SETS:
        key = other
    counts[key] = counts.get(key, 0) + 1


class _LiveCollector:
    """Samples built at scrape time: served requests, peers, and token state."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are fixed and distinct from the registered metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield _counter(
            "http_requests", "HTTP requests served.", ("profile", "transport", "status"), m.requests
        )
        yield _counter(
            "peer_connections", "Unix socket connections by peer.", ("uid", "gid"), m.peers
        )
        if m.status_fn is not None:
            yield from _status_families(m.status_fn())


def _counter(
    name: str, doc: str, labels: tuple[str, ...], counts: dict[tuple[object, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for key, value in list(counts.items()):
        family.add_metric([str(part) for part in key], value)
    return family


def _status_families(statuses: Iterable[ProfileStatus]) -> Iterator[Metric]:
    expires = GaugeMetricFamily(
        f"{PREFIX}_token_expires_in_seconds",
        "Seconds until the held token expires.",
        labels=("profile",),
    )
    valid = GaugeMetricFamily(
        f"{PREFIX}_token_valid", "1 if the profile holds a servable token.", labels=("profile",)
    )
    state = GaugeMetricFamily(
        f"{PREFIX}_profile_state", "1 for the profile's current state.", labels=("profile", "state")
    )
    for s in statuses:
        if s.expires_in is not None:
            expires.add_metric((s.profile,), s.expires_in)
        valid.add_metric((s.profile,), 1.0 if s.valid else 0.0)
        for name in STATES:
            state.add_metric((s.profile, name), 1.0 if s.state == name else 0.0)
    yield from (expires, valid, state)


class Metrics:
    """Every metric the broker exposes at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Keys keep ints as ints: str() happens at scrape time, not per request.
        self.requests: dict[tuple[object, ...], int] = {}
        self.peers: dict[tuple[object, ...], int] = {}
        self.status_fn: StatusFn | None = None
        r = self.registry
        self._refreshes = Counter(
            f"{PREFIX}_refreshes", "Token refreshes by outcome.", ("profile", "outcome"), registry=r
        )
        self._upstream_seconds = Histogram(
            f"{PREFIX}_upstream_request_seconds", "Latency of upstream token requests.",
            ("profile",), registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self._upstream_responses = Counter(
            f"{PREFIX}_upstream_responses", "Upstream token responses by HTTP status.",
            ("profile", "status"), registry=r,
        )  # fmt: skip
        self._throttled = Counter(
            f"{PREFIX}_throttled", "HTTP 429 answers from upstream.", ("account",), registry=r
        )
        self._waiters = Histogram(
            f"{PREFIX}_refresh_waiters", "Consumers that rode on one refresh.", ("profile",),
            registry=r, buckets=(0, 1, 2, 5, 10, 20, 50, 100, 500),
        )  # fmt: skip
        self.registry.register(_LiveCollector(self))

    def observe_refresh(self, profile: str, outcome: str) -> None:
        """One refresh ended: ok | credentials_rejected | request_rejected | throttled |
        upstream_unavailable | no_progress."""
        self._refreshes.labels(profile, outcome).inc()

    def observe_upstream(self, profile: str, seconds: float, status: int | None) -> None:
        """One upstream token request took ``seconds``; ``status`` None: no HTTP answer."""
        self._upstream_seconds.labels(profile).observe(seconds)
        self._upstream_responses.labels(profile, "none" if status is None else str(status)).inc()

    def observe_throttled(self, account: str) -> None:
        self._throttled.labels(account).inc()

    def observe_coalesced(self, profile: str, waiters: int) -> None:
        """``waiters`` consumers were answered by one refresh."""
        self._waiters.labels(profile).observe(waiters)

    def observe_request(self, profile: str, transport: str, status: int) -> None:
        """One HTTP response (hot path: a dict increment)."""
        _bump(self.requests, (profile, transport, status), (OTHER, transport, status))

    def request_key(self, profile: str, transport: str, status: int) -> tuple[object, ...]:
        """The key ``observe_request`` would count under, for callers that count it themselves
        (``requests[key] = requests.get(key, 0) + 1``): the label cap decides it now."""
        key: tuple[object, ...] = (profile, transport, status)
        if key in self.requests or len(self.requests) < MAX_LABEL_SETS:
            return key
        return (OTHER, transport, status)

    def observe_peer(self, uid: int, gid: int) -> None:
        """One Unix socket connection from ``uid``/``gid``."""
        _bump(self.peers, (uid, gid), (OTHER, OTHER))

    def bind_status(self, status: StatusFn) -> None:
        """Read token expiry, validity and state from ``status()`` at every scrape."""
        self.status_fn = status

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
