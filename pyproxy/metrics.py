"""Request metrics: plain counters on the hot path, Prometheus text at scrape time.

Each finished request costs a few dict and list operations here. The
exposition is prometheus_client's: a custom collector turns these counters
(and the pool's, the cache's and the coalescer's) into metric families when
``/metrics`` is scraped, so the hot path never touches a client library lock.
With several workers, each worker's ``snapshot()`` is summed by the
supervisor (``merge_snapshots``).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from pyproxy.proxy import Proxy

# Seconds; the shape of the usual HTTP latency buckets, finer at the low end
# where a proxy's own time lives.
DURATION_BUCKETS: Tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


# The upstream label of one --upstream (the gateway's upstreams have their names).
DEFAULT_UPSTREAM = "default"


class Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = bounds  # upper bounds, ascending
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> Dict[str, Any]:
        return {"counts": list(self.counts), "total": self.total, "count": self.count}


class RequestMetrics:
    """Counters fed once per finished request (see ClientConnection._observe)."""

    def __init__(self) -> None:
        self.requests: Dict[Tuple[str, str, str], int] = {}
        self.durations: Dict[Tuple[str, str], Histogram] = {}
        self.upstream_ttfb: Dict[Tuple[str, str], Histogram] = {}  # by (endpoint, upstream)
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_errors: Dict[str, int] = {}
        # Protective limits that fired, by limit (header_size, body_timeout, ...): so an
        # operator can tell a slowloris or a flood from a bug.
        self.limits: Dict[str, int] = {}

    def limit_fired(self, limit: str) -> None:
        self.limits[limit] = self.limits.get(limit, 0) + 1

    def request_done(
        self,
        endpoint: str,
        method: str,
        status: int,
        duration: float,
        ttfb: float,
        bytes_in: int,
        bytes_out: int,
        upstream: str = "",
    ) -> None:
        key = (endpoint, method, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.durations.get((endpoint, method))
        if hist is None:
            hist = self.durations[(endpoint, method)] = Histogram()
        hist.observe(duration)
        if ttfb >= 0:
            ttfb_key = (endpoint, upstream or DEFAULT_UPSTREAM)
            up = self.upstream_ttfb.get(ttfb_key)
            if up is None:
                up = self.upstream_ttfb[ttfb_key] = Histogram()
            up.observe(ttfb)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1


def snapshot(proxy: "Proxy") -> Dict[str, Any]:
    """Every number /metrics shows, as plain JSON-able data (summable across workers)."""
    m = proxy.metrics
    pool = proxy.pool
    data: Dict[str, Any] = {
        "requests": [[list(k), v] for k, v in m.requests.items()],
        "durations": [[list(k), h.snapshot()] for k, h in m.durations.items()],
        "upstream_ttfb": [[list(k), h.snapshot()] for k, h in m.upstream_ttfb.items()],
        "bytes_in": m.bytes_in,
        "bytes_out": m.bytes_out,
        "upstream_errors": dict(m.upstream_errors),
        "client_errors": proxy.stats_client_errors,
        "sse_pings": proxy.stats_sse_pings,
        "early_heads": proxy.gateway.early_heads if proxy.gateway is not None else 0,
        "limits": {
            **m.limits,
            "pool_timeout": pool.stats.pool_timeouts,
            "inflight_buffer": proxy.coalescer.stats.over_budget,
            "dedup_backlog": proxy.coalescer.stats.dropped_slow,
        },
        "in_flight": sum(1 for c in proxy.connections if c.busy),
        "client_connections": len(proxy.connections),
        "pool": {
            "active": len(pool.active),
            "idle": len(pool.idle),
            "connecting": pool.connecting,
            "waiting": len(pool.waiters),
            **{name: getattr(pool.stats, name) for name in pool.stats.__slots__},
        },
        "dedup": proxy.coalescer.stats.as_dict(),
    }
    if proxy.cache is not None:
        data["cache"] = proxy.cache.stats.as_dict()
    if proxy.gateway is not None:
        data["upstreams"] = proxy.gateway.snapshot()
        if proxy.gateway.batcher is not None:
            data["batching"] = proxy.gateway.batcher.stats.snapshot()
        if proxy.gateway.admission is not None:
            data["usage"] = proxy.gateway.admission.snapshot()
    return data


def merge_snapshots(snapshots: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Sum worker snapshots: counters and gauges alike (gauges sum across processes)."""
    merged: Dict[str, Any] = {}
    requests: Dict[Tuple[str, ...], int] = {}
    durations: Dict[Tuple[str, ...], Dict[str, Any]] = {}
    ttfb: Dict[Tuple[str, ...], Dict[str, Any]] = {}
    upstreams: Dict[str, Dict[str, Any]] = {}
    batching: Dict[str, Any] = {}
    usage: Dict[str, Any] = {}
    for snap in snapshots:
        if "batching" in snap:
            _merge_batching(batching, snap["batching"])
        if "usage" in snap:
            _merge_usage(usage, snap["usage"])
        for name, numbers in snap.get("upstreams", {}).items():
            into = upstreams.setdefault(name, {"requests": {}, "attempts": {}, "ejections": 0, "up": 0, "in_flight": 0})
            for table in ("requests", "attempts"):
                for label, value in numbers[table].items():
                    into[table][label] = into[table].get(label, 0) + value
            for name_ in ("ejections", "in_flight"):
                into[name_] += numbers[name_]
            into["up"] = max(into["up"], numbers["up"])  # up if any worker has it in rotation
        for key, value in snap["requests"]:
            requests[tuple(key)] = requests.get(tuple(key), 0) + value
        for key, hist in snap["durations"]:
            _add_hist(durations, tuple(key), hist)
        for key, hist in snap["upstream_ttfb"]:
            _add_hist(ttfb, tuple(key), hist)
        for name in (
            "bytes_in",
            "bytes_out",
            "client_errors",
            "sse_pings",
            "early_heads",
            "in_flight",
            "client_connections",
        ):
            merged[name] = merged.get(name, 0) + snap.get(name, 0)
        for group in ("pool", "dedup", "cache", "upstream_errors", "limits"):
            if group in snap:
                target = merged.setdefault(group, {})
                for name, value in snap[group].items():
                    target[name] = target.get(name, 0) + value
    merged["requests"] = [[list(k), v] for k, v in requests.items()]
    merged["durations"] = [[list(k), h] for k, h in durations.items()]
    merged["upstream_ttfb"] = [[list(k), h] for k, h in ttfb.items()]
    if upstreams:
        merged["upstreams"] = upstreams
    if batching:
        merged["batching"] = batching
    if usage:
        merged["usage"] = {
            name: [[list(k), v] for k, v in value.items()] if name in _USAGE_LABELLED else value
            for name, value in usage.items()
        }
    return merged


# The usage snapshot's tables of [labels, value] (summed per labels), and its per-name rows.
_USAGE_LABELLED = ("tokens", "rate_limited", "token_usage", "ttft", "tpot")


def _merge_usage(into: Dict[str, Any], numbers: Dict[str, Any]) -> None:
    for name in _USAGE_LABELLED:
        table = into.setdefault(name, {})
        for labels, value in numbers.get(name, []):
            if isinstance(value, dict):  # a histogram
                _add_hist(table, tuple(labels), value)
            else:
                table[tuple(labels)] = table.get(tuple(labels), 0) + value
    into["unknown"] = into.get("unknown", 0) + numbers.get("unknown", 0)
    in_flight = into.setdefault("in_flight", {})
    for scope, value in numbers.get("in_flight", {}).items():
        in_flight[scope] = in_flight.get(scope, 0) + value
    for group in ("per_key", "per_tenant"):
        rows = into.setdefault(group, {})
        for name, row in numbers.get(group, {}).items():
            target = rows.setdefault(name, {})
            for field, value in row.items():
                target[field] = target.get(field, 0) + value


def _merge_batching(into: Dict[str, Any], numbers: Dict[str, Any]) -> None:
    for name in ("batches", "inputs"):
        into[name] = into.get(name, 0) + numbers[name]
    fallbacks = into.setdefault("fallbacks", {})
    for reason, value in numbers["fallbacks"].items():
        fallbacks[reason] = fallbacks.get(reason, 0) + value
    hists = into.setdefault("_hists", {})
    for name in ("inputs_per_batch", "wait"):
        _add_hist(hists, name, numbers[name])
        into[name] = hists[name]


def _add_hist(target: Dict[Any, Dict[str, Any]], key: Any, hist: Dict[str, Any]) -> None:
    into = target.get(key)
    if into is None:
        target[key] = {"counts": list(hist["counts"]), "total": hist["total"], "count": hist["count"]}
        return
    into["counts"] = [a + b for a, b in zip(into["counts"], hist["counts"])]
    into["total"] += hist["total"]
    into["count"] += hist["count"]


class SnapshotCollector:
    """A prometheus_client collector over a snapshot source (one process, or the supervisor's merge)."""

    def __init__(self, source: Any) -> None:
        self.source = source  # () -> snapshot dict

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.source()
        requests = CounterMetricFamily(
            "proxy_requests",
            "Requests answered, by endpoint, method and status",
            labels=["endpoint", "method", "status"],
        )
        for (endpoint, method, status), value in snap["requests"]:
            requests.add_metric([endpoint, method, status], value)
        yield requests
        durations = HistogramMetricFamily(
            "proxy_request_duration_seconds",
            "Time from a request's head to its response's end",
            labels=["endpoint", "method"],
        )
        for (endpoint, method), hist in snap["durations"]:
            durations.add_metric([endpoint, method], _buckets(hist), hist["total"])
        yield durations
        ttfb = HistogramMetricFamily(
            "proxy_upstream_ttfb_seconds",
            "Time from sending a request upstream to its response head",
            labels=["endpoint", "upstream"],
        )
        for (endpoint, upstream), hist in snap["upstream_ttfb"]:
            ttfb.add_metric([endpoint, upstream], _buckets(hist), hist["total"])
        yield ttfb
        yield from _upstream_families(snap.get("upstreams"))
        yield from _batching_families(snap.get("batching"))
        yield from _usage_families(snap.get("usage"))
        yield _single(GaugeMetricFamily, "proxy_requests_in_flight", "Requests being answered", snap["in_flight"])
        yield _single(
            GaugeMetricFamily, "proxy_client_connections", "Open client connections", snap["client_connections"]
        )
        yield _single(CounterMetricFamily, "proxy_bytes_received", "Request body bytes from clients", snap["bytes_in"])
        yield _single(CounterMetricFamily, "proxy_bytes_sent", "Response body bytes to clients", snap["bytes_out"])
        yield _single(
            CounterMetricFamily, "proxy_client_errors", "Malformed requests answered with a 4xx", snap["client_errors"]
        )
        yield _single(
            CounterMetricFamily,
            "proxy_sse_pings",
            "Keep-alive comments written on silent event streams (--sse-keepalive)",
            snap.get("sse_pings", 0),
        )
        yield _single(
            CounterMetricFamily,
            "proxy_early_heads",
            "Streams answered 200 by pyproxy before the upstream (early_head_after)",
            snap.get("early_heads", 0),
        )
        limits = CounterMetricFamily(
            "proxy_limits_fired",
            "Times a protective limit answered or cut a request, by limit",
            labels=["limit"],
        )
        for limit, value in sorted(snap.get("limits", {}).items()):
            limits.add_metric([limit], value)
        yield limits
        errors = CounterMetricFamily("proxy_upstream_errors", "Upstream failures by kind", labels=["kind"])
        for kind, value in sorted(snap.get("upstream_errors", {}).items()):
            errors.add_metric([kind], value)
        yield errors
        pool = snap["pool"]
        gauge = GaugeMetricFamily("proxy_upstream_connections", "Upstream connections by state", labels=["state"])
        for state in ("active", "idle", "connecting"):
            gauge.add_metric([state], pool[state])
        yield gauge
        yield _single(
            GaugeMetricFamily, "proxy_upstream_pool_waiting", "Requests waiting for a connection", pool["waiting"]
        )
        for name, help_text in (
            ("connects", "Upstream connections opened"),
            ("reuses", "Requests sent on a reused keep-alive connection"),
            ("connect_errors", "Upstream connections that failed to open"),
            ("pool_timeouts", "Requests that waited past --pool-timeout"),
            ("expired", "Idle upstream connections closed by expiry"),
            ("stale_closed", "Idle upstream connections found closed by the upstream"),
            ("stale_retries", "Requests retried after a reused connection dropped"),
        ):
            yield _single(CounterMetricFamily, f"proxy_upstream_{name}", help_text, pool[name])
        cache = snap.get("cache")
        if cache is not None:
            lookups = CounterMetricFamily("proxy_cache_requests", "Cache outcomes (X-Cache)", labels=["result"])
            for result in ("hits", "misses", "stale", "bypass"):
                lookups.add_metric([result], cache[result])
            yield lookups
            for name, help_text in (
                ("stores", "Responses stored"),
                ("evictions", "Entries evicted by the memory bounds"),
                ("too_large", "Responses too large to store"),
                ("errors", "Cache backend (Redis) errors"),
                ("refreshes", "Background stale-while-revalidate refreshes"),
                ("stale_if_error", "Stale entries served because the upstream failed"),
            ):
                yield _single(CounterMetricFamily, f"proxy_cache_{name}", help_text, cache[name])
            yield _single(
                GaugeMetricFamily, "proxy_cache_bytes", "Bytes held by the memory cache", cache["bytes_stored"]
            )
            yield _single(GaugeMetricFamily, "proxy_cache_entries", "Entries in the memory cache", cache["entries"])
        dedup = snap["dedup"]
        for name, help_text in (
            ("leaders", "Upstream fetches others could join"),
            ("followers", "Requests served by another request's fetch"),
            ("replays", "Followers that joined mid-response"),
            ("dropped_slow", "Coalesced clients disconnected for falling behind"),
            ("over_budget", "Responses relayed without being kept: in-flight buffers were at their bound"),
        ):
            yield _single(CounterMetricFamily, f"proxy_dedup_{name}", help_text, dedup[name])
        yield _single(GaugeMetricFamily, "proxy_dedup_in_flight", "Coalescable fetches in flight", dedup["in_flight"])
        yield _single(
            GaugeMetricFamily,
            "proxy_inflight_buffer_bytes",
            "Response bytes kept by requests in flight, for the cache and late joiners",
            dedup["retained_bytes"],
        )


def _upstream_families(upstreams: Any) -> Iterator[Any]:
    """The gateway's per-upstream metrics; labels are configured names only."""
    if not upstreams:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    requests = CounterMetricFamily(
        "proxy_upstream_requests", "Responses from each upstream, by status", labels=["upstream", "status"]
    )
    attempts = CounterMetricFamily(
        "proxy_upstream_attempts",
        "Attempts on each upstream, by outcome (success, retried, failure, connect_error, reset, timeout, stale)",
        labels=["upstream", "outcome"],
    )
    ejections = CounterMetricFamily("proxy_upstream_ejections", "Times an upstream was ejected", labels=["upstream"])
    up = GaugeMetricFamily("proxy_upstream_up", "1 if the upstream is in rotation", labels=["upstream"])
    in_flight = GaugeMetricFamily("proxy_upstream_in_flight", "Attempts in flight", labels=["upstream"])
    for name, numbers in sorted(upstreams.items()):
        for status, value in sorted(numbers["requests"].items()):
            requests.add_metric([name, status], value)
        for outcome, value in sorted(numbers["attempts"].items()):
            attempts.add_metric([name, outcome], value)
        ejections.add_metric([name], numbers["ejections"])
        up.add_metric([name], numbers["up"])
        in_flight.add_metric([name], numbers["in_flight"])
    yield from (requests, attempts, ejections, up, in_flight)


def _batching_families(batching: Any) -> Iterator[Any]:
    """The embeddings batcher's metrics ([[batching]])."""
    if not batching:
        return
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    from pyproxy.gateway.batcher import INPUT_BUCKETS, WAIT_BUCKETS

    yield _single(
        CounterMetricFamily, "proxy_batch_requests", "Upstream requests sent by the batcher", batching["batches"]
    )
    yield _single(CounterMetricFamily, "proxy_batch_inputs", "Inputs those requests carried", batching["inputs"])
    fallbacks = CounterMetricFamily(
        "proxy_batch_fallbacks",
        "Requests a batching rule covers that went alone, by reason (too_large, unbatchable, client_error)",
        labels=["reason"],
    )
    for reason, value in sorted(batching["fallbacks"].items()):
        fallbacks.add_metric([reason], value)
    yield fallbacks
    for name, key, bounds, help_text in (
        ("proxy_batch_size_inputs", "inputs_per_batch", INPUT_BUCKETS, "Inputs per upstream request of the batcher"),
        ("proxy_batch_wait_seconds", "wait", WAIT_BUCKETS, "Time a request waited for its batch to be sent"),
    ):
        hist = batching[key]
        family = HistogramMetricFamily(name, help_text)
        family.add_metric([], _buckets(hist, bounds), hist["total"])
        yield family


def _usage_families(usage: Any) -> Iterator[Any]:
    """Client keys' metrics ([auth] mode = "keys"): labels are configured key names and
    public model names (else "other"); the gen_ai_* histograms are the OpenTelemetry
    GenAI conventions' client and server metrics, with their bucket boundaries."""
    if not usage:
        return
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    from pyproxy.gateway.admission import TOKEN_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

    tokens = CounterMetricFamily(
        "proxy_tokens", "Tokens used upstream, by client key, public model and type", labels=["key", "model", "type"]
    )
    for labels, value in usage["tokens"]:
        tokens.add_metric(labels, value)
    yield tokens
    limited = CounterMetricFamily(
        "proxy_rate_limited",
        "Requests refused 429, by key, reason (requests, tokens, concurrency, upstream) and source (proxy, upstream)",
        labels=["key", "reason", "source"],
    )
    for labels, value in usage["rate_limited"]:
        limited.add_metric(labels, value)
    yield limited
    yield _single(
        CounterMetricFamily,
        "proxy_usage_unknown",
        "Successful responses that reported no token usage (their estimate was kept)",
        usage["unknown"],
    )
    for name, table, bounds, labels, help_text in (
        ("gen_ai_client_token_usage", "token_usage", TOKEN_BUCKETS, ["gen_ai_request_model", "gen_ai_token_type"],
         "Tokens per request, by model and type (input, output)"),
        ("gen_ai_server_time_to_first_token_seconds", "ttft", TTFT_BUCKETS, ["gen_ai_request_model"],
         "Time from admission to the first response body byte"),
        ("gen_ai_server_time_per_output_token_seconds", "tpot", TPOT_BUCKETS, ["gen_ai_request_model"],
         "Time per output token after the first"),
    ):  # fmt: skip
        family = HistogramMetricFamily(name, help_text, labels=labels)
        for label_values, hist in usage[table]:
            family.add_metric(label_values, _buckets(hist, bounds), hist["total"])
        yield family


def _buckets(hist: Dict[str, Any], bounds: Sequence[float] = DURATION_BUCKETS) -> List[Tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip(list(bounds) + [float("inf")], hist["counts"]):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


def _single(cls: Any, name: str, help_text: str, value: float) -> Any:
    """A metric family (counter or gauge) of one unlabelled sample."""
    family = cls(name, help_text)
    family.add_metric([], value)
    return family


def render(source: Any) -> Tuple[bytes, str]:
    """The Prometheus text exposition of a snapshot source, and its content type."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return generate_latest(registry), CONTENT_TYPE_LATEST
