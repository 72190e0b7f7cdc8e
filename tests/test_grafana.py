"""The Grafana dashboard in contrib/ queries what hotproxy really exports.

Every metric name the dashboard's expressions (panels, template variables,
annotations) reference must be a family of ``hotproxy.metrics.METRICS`` as
``/metrics`` exposes it -- a gauge by its name, a counter by its ``_total``
sample, a histogram by its ``_bucket``/``_count``/``_sum`` -- and every label
it selects on or groups by must be one of that family's labels (or
``instance``/``job``, which Prometheus adds).  A renamed metric or label
fails here instead of leaving a panel empty.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from hotproxy.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "hotproxy.json"
#: labels the scraping Prometheus adds to every series
TARGET_LABELS = {"instance", "job"}
NAME = re.compile(r"\b(hotproxy_[a-z0-9_]+)\s*(\{[^}]*\})?")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def samples() -> dict[str, str]:
    """Every sample name ``/metrics`` can expose -> its family."""
    out: dict[str, str] = {}
    for name, doc in METRICS.items():
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "summary": ("", "_count", "_sum", "_created")}.get(doc.type, ("",))
        for suffix in suffixes:
            out[name + suffix] = name
    return out


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: targets' and annotations' ``expr``, template queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def test_every_metric_and_label_the_dashboard_queries_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = samples()
    exprs = list(expressions(dashboard))
    assert len(exprs) >= 20, exprs
    used: set[str] = set()
    problems = []
    for expr in exprs:
        families = []
        for m in NAME.finditer(expr):
            name, selector = m.group(1), m.group(2) or ""
            family = known.get(name)
            if family is None:
                problems.append(f"{name} (in {expr!r}) is not exported")
                continue
            families.append(family)
            used.add(family)
            for label in SELECTOR_LABEL.findall(selector):
                if label not in METRICS[family].labels and label not in TARGET_LABELS:
                    problems.append(f"{name} has no label {label!r} (in {expr!r})")
        for group in BY.findall(expr):
            for label in (lab.strip() for lab in group.split(",") if lab.strip()):
                if label not in TARGET_LABELS and not any(label in METRICS[f].labels for f in families):
                    problems.append(f"by ({label}) names no label of {families} (in {expr!r})")
        m = re.search(r"label_values\(\s*([a-z0-9_]+)[^,]*,\s*([a-z_]+)\s*\)", expr)
        if m and m.group(1) in known and m.group(2) not in TARGET_LABELS:
            if m.group(2) not in METRICS[known[m.group(1)]].labels:
                problems.append(f"label_values: {m.group(1)} has no label {m.group(2)!r}")
    assert not problems, "\n".join(problems)
    print(f"dashboard: {len(exprs)} expressions over {len(used)} of {len(METRICS)} metric families")
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
