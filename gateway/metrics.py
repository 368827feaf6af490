"""Prometheus metrics, one registry per application instance (so tests can build many)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LE = (*(repr(bound) for bound in LATENCY_BUCKETS), "+Inf")  # the bounds as Prometheus writes them


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.minted = Counter("gateway_grants_minted", "Grants minted.", ["app", "dialect"], registry=self.registry)
        self.redeemed = Counter(
            "gateway_grants_redeemed", "Grants redeemed.", ["app", "dialect"], registry=self.registry
        )
        self.refused = Counter(
            "gateway_grants_refused",
            "Mints and redemptions refused, by reason.",
            ["app", "dialect", "reason"],
            registry=self.registry,
        )
        self.reused = Counter(
            "gateway_grants_reused",
            "Redemption attempts of an already redeemed grant.",
            ["app"],
            registry=self.registry,
        )
        self.revoked = Counter(
            "gateway_grants_revoked", "Live grants revoked on the admin listener.", ["app"], registry=self.registry
        )
        self.latency = Latency()
        self.registry.register(self.latency)

        self._minted: dict[tuple[str, str], Any] = {}

    def observe(self, kind: str, seconds: float) -> None:
        """Record one request's latency."""
        self.latency.observe(kind, seconds)

    def count_minted(self, app: str, dialect: str, grants: int) -> None:
        """Count minted grants (the labelled child is looked up once per app)."""
        child = self._minted.get((app, dialect))
        if child is None:
            child = self._minted[app, dialect] = self.minted.labels(app, dialect)
        child.inc(grants)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Latency(Collector):
    """``gateway_request_duration_seconds`` by kind of request: every request is observed, so each observation is
    one bisect and two additions on plain lists; the histogram is built only when scraped."""

    def __init__(self) -> None:
        self._kinds: dict[str, tuple[list[int], list[float]]] = {}  # kind -> (count per bucket, [sum])

    def observe(self, kind: str, seconds: float) -> None:
        found = self._kinds.get(kind)
        if found is None:
            found = self._kinds[kind] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        found[0][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        found[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "gateway_request_duration_seconds", "Request latency by kind of request.", labels=["kind"]
        )
        for kind, (counts, total) in self._kinds.items():
            cumulative, buckets = 0, []
            for le, count in zip(_LE, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric([kind], buckets, total[0])
        yield family
