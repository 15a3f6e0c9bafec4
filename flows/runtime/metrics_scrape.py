"""Read fanfare's Prometheus counters from running workers and sum them across processes.

`scrape` sums fanfare's samples over endpoints (the demo and the benchmarks use it);
`fetch_text`, `parse` and `exposed_names` read one endpoint (`fanfare metrics`, the dashboard
test); `histogram_quantile` estimates a percentile from cumulative buckets as Prometheus does.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, tuple[tuple[str, str], ...]]

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_DECLARED = re.compile(r"^# (?:HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*)(?: (\S+))?", re.MULTILINE)


def fetch_text(url: str, timeout_s: float = 2.0) -> str:
    """The exposition text of one endpoint (raises OSError when it does not answer)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
    return body.decode("utf-8")


def parse(text: str, prefixes: tuple[str, ...] = ("fanfare_",)) -> dict[Sample, float]:
    """{(sample name, sorted labels): value} of the families whose names start with a prefix."""
    out: dict[Sample, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefixes):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return dict(out)


def scrape(urls: Iterable[str], timeout_s: float = 2.0) -> dict[Sample, float]:
    """{(sample name, sorted labels): value} summed over every endpoint; unreachable ones raise."""
    totals: dict[Sample, float] = defaultdict(float)
    for url in urls:
        for key, value in parse(fetch_text(url, timeout_s)).items():
            totals[key] += value
    return dict(totals)


def exposed_names(text: str) -> set[str]:
    """Every metric name a PromQL query could use against this exposition.

    Declared families (HELP/TYPE lines, present even before a labelled metric has a series),
    with `_bucket`, `_sum` and `_count` for histograms and summaries, and every sample's name.
    """
    names: set[str] = set()
    for m in _DECLARED.finditer(text):
        name, kind = m.group(1), m.group(2)
        names.add(name)
        if kind in ("histogram", "summary"):
            names.update(name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


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


def by_labels(
    samples: dict[Sample, float], name: str, labels: tuple[str, ...]
) -> dict[tuple[str, ...], float]:
    """A metric's totals grouped by several labels (in the order given)."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name:
            d = dict(ls)
            out[tuple(d.get(label, "") for label in labels)] += v
    return dict(out)


def buckets(samples: dict[Sample, float], name: str, **labels: str) -> list[tuple[float, float]]:
    """A histogram's cumulative (upper bound, count) pairs, summed over matching label sets."""
    want = set(labels.items())
    out: dict[float, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n != name + "_bucket" or not want <= set(ls):
            continue
        out[float(dict(ls)["le"])] += v
    return sorted(out.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The q-quantile (0..1) from cumulative buckets, interpolated linearly within a bucket.

    Like PromQL's histogram_quantile: an answer in the +Inf bucket is the highest finite bound
    (so "at least this"); None when there are no observations.
    """
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    count = cumulative[-1][1]
    rank = q * count
    lower, below = 0.0, 0.0
    for bound, cum in cumulative:
        if cum >= rank and cum > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (cum - below)
        lower, below = bound, cum
    return lower
