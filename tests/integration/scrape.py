"""Read the proxy's ``/metrics`` the way Prometheus does (its text format), for assertions.

Metrics live in the process-wide default registry, and every proxy a test starts runs in
the test process: compare a scrape with an earlier one (``delta``), not with zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    samples: tuple[tuple[str, dict[str, str], float], ...]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
            for sample, sample_labels, _ in self.samples
        )

    def delta(self, earlier: Scrape, name: str, **labels: str) -> float:
        return self.value(name, **labels) - earlier.value(name, **labels)


async def scrape(http: aiohttp.ClientSession, base_url: str) -> Scrape:
    async with http.get(f"{base_url}/metrics") as response:
        assert response.status == 200, response.status
        text = await response.text()
    samples = tuple(
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )
    return Scrape(samples)
