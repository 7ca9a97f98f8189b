# -*- test-case-name: tests.test_metrics_merge -*-
"""
One C{/metrics} for every worker process: their Prometheus texts merged,
each series summed over the workers (connections, logins, bytes, latency
buckets, CPU and memory), but for the few where a sum means nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Samples where the earliest (start times, creation times) or the smallest
# (each process's descriptor limit) is the merged value, not the sum.
_EARLIEST = ("process_start_time_seconds",)
_SMALLEST = ("process_max_fds",)


def mergedSamples(texts: Iterable[str]) -> list[Metric]:
    """
    The metric families of C{texts} (Prometheus's text format) with equal
    series combined.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                before = series.get(key)
                if before is None:
                    series[key] = sample.value
                elif sample.name.endswith("_created") or sample.name in _EARLIEST or sample.name in _SMALLEST:
                    series[key] = min(before, sample.value)
                else:
                    series[key] = before + sample.value
    for name, family in families.items():
        for (sampleName, labels), value in values[name].items():
            family.add_sample(sampleName, dict(labels), value)
    return list(families.values())


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def mergedExposition(texts: Iterable[str]) -> bytes:
    """
    C{texts} merged, in Prometheus's text format.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(mergedSamples(texts)))
    return generate_latest(registry)
