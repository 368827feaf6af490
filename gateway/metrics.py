"""Prometheus metrics, one registry per application instance (so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


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
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Request latency by kind of request.",
            ["kind"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self._latency_by_kind: dict[str, Histogram] = {}

    def observe(self, kind: str, seconds: float) -> None:
        """Record one request's latency (the labelled child is looked up once per kind)."""
        child = self._latency_by_kind.get(kind)
        if child is None:
            child = self._latency_by_kind[kind] = self.latency.labels(kind)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
