"""Read fanfare's Prometheus counters from running workers and sum them across processes."""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(urls: Iterable[str], timeout_s: float = 2.0) -> dict[Sample, float]:
    """{(sample name, sorted labels): value} summed over every endpoint; unreachable ones raise."""
    totals: dict[Sample, float] = defaultdict(float)
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8")
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("fanfare_"):
                continue
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                totals[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return dict(totals)


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of a counter over every label set matching `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def by_label(samples: dict[Sample, float], name: str, label: str) -> dict[str, float]:
    """A counter's totals grouped by one label."""
    out: dict[str, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name:
            out[dict(ls).get(label, "")] += v
    return dict(out)
