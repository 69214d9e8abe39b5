"""The serving metrics' own histogram renders exactly what prometheus_client's does."""

import prometheus_client as prom
import pytest

from coltrain.serve.metrics import Histogram, parse_metrics


def _samples(registry, name):
  return {k: v for k, v in parse_metrics(prom.generate_latest(registry).decode()).items()
          if k.startswith(name) and "_created" not in k}


def test_histogram_matches_prometheus_client_for_the_same_values():
  bounds = (0.001, 0.002, 0.005, 1.0)
  values = [0.0, 0.0005, 0.001, 0.0010001, 0.002, 0.003, 0.005, 0.7, 1.0, 1.5, 99.0]
  ours, theirs = prom.CollectorRegistry(), prom.CollectorRegistry()
  h = Histogram("x_seconds", "doc", bounds, ours)
  ref = prom.Histogram("x_seconds", "doc", buckets=bounds, registry=theirs)
  h.observe_many(values[:4])         # a batch at once, then one by one: same counts
  for v in values[4:]:
    h.observe(v)
  for v in values:
    ref.observe(v)
  got, want = _samples(ours, "x_seconds"), _samples(theirs, "x_seconds")
  assert got == pytest.approx(want) and len(got) == len(bounds) + 3   # + +Inf, count, sum
  # bounds are inclusive: 0, 0.0005 and 0.001 count in le="0.001", 0.0010001 does not
  assert got['x_seconds_bucket{le="0.001"}'] == 3 and got['x_seconds_count'] == 11
  assert got['x_seconds_bucket{le="+Inf"}'] == 11


def test_histogram_rejects_bounds_that_do_not_increase():
  for bounds in ((), (1.0, 1.0), (2.0, 1.0)):
    with pytest.raises(ValueError, match="increasing"):
      Histogram("y", "doc", bounds, prom.CollectorRegistry())
