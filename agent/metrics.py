"""Prometheus metrics from the agent's stats(): a loopback /metrics endpoint and a textfile."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import start_http_server
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from agent import __version__

log = structlog.get_logger(__name__)

Stats = Callable[[], dict[str, Any]]

TEXTFILE_MODE = 0o644  # node_exporter runs as its own user and must read the file
# Numeric leaves no curated metric takes are exported as exfilwatch_component_value up to
# this many series a scrape: a component that grows a dict keyed by data (paths, pids) must
# not flood the TSDB. What is left out is counted in exfilwatch_component_values_omitted.
FALLBACK_MAX = 1000
_FALLBACK_DEPTH = 4  # below this, a dict is data rather than counters

# (stats path, metric type, metric name, help). Counters are given without `_total`, which
# prometheus_client appends. A path absent from stats() is skipped: the metric appears when
# a component starts reporting it (outbox, ruleset, max_user_watches are newer than this).
SCALARS: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("uptime_s",), "gauge", "exfilwatch_uptime_seconds", "Seconds since the agent started."),
    (
        ("max_user_watches",),
        "gauge",
        "exfilwatch_inotify_max_user_watches",
        "The kernel's fs.inotify.max_user_watches.",
    ),
    (("pipeline", "queued"), "gauge", "exfilwatch_pipeline_queued", "Events queued, all lanes."),
    (
        ("pipeline", "queue_size"),
        "gauge",
        "exfilwatch_pipeline_queue_size",
        "Capacity of the event queue, all lanes.",
    ),
    (
        ("pipeline", "processed"),
        "counter",
        "exfilwatch_events_processed",
        "Events the pipeline processed.",
    ),
    (
        ("pipeline", "dropped_total"),
        "counter",
        "exfilwatch_events_dropped",
        "Events dropped because the pipeline queue was full.",
    ),
    (("inotify", "watches"), "gauge", "exfilwatch_inotify_watches", "inotify watches held."),
    (
        ("inotify", "file_watches"),
        "gauge",
        "exfilwatch_inotify_file_watches",
        "inotify watches held on single files.",
    ),
    (
        ("inotify", "skipped_at_limit"),
        "gauge",
        "exfilwatch_inotify_skipped_at_limit",
        "Directories left unwatched at the watch limit.",
    ),
    (
        ("inotify", "overflows"),
        "counter",
        "exfilwatch_inotify_overflows",
        "inotify queue overflows (events lost in the kernel, then rescanned).",
    ),
    (
        ("inotify", "events_read"),
        "counter",
        "exfilwatch_inotify_events_read",
        "Events read from inotify.",
    ),
    (("process", "rss_bytes"), "gauge", "exfilwatch_rss_bytes", "Resident memory of the agent."),
    (("process", "threads"), "gauge", "exfilwatch_threads", "Threads of the agent process."),
    (
        ("engine", "correlations"),
        "gauge",
        "exfilwatch_correlation_rules",
        "Correlation rules loaded.",
    ),
    (
        ("engine", "groups"),
        "gauge",
        "exfilwatch_correlation_groups",
        "Open correlation groups (windows in memory).",
    ),
    (
        ("engine", "matched"),
        "counter",
        "exfilwatch_rule_matches",
        "Rule matches, before correlation and suppression.",
    ),
    (("outbox", "backlog"), "gauge", "exfilwatch_outbox_backlog", "Lines waiting in the outbox."),
    (
        ("outbox", "oldest_age_s"),
        "gauge",
        "exfilwatch_outbox_oldest_age_seconds",
        "Age of the oldest line waiting in the outbox.",
    ),
    (("outbox", "bytes"), "gauge", "exfilwatch_outbox_bytes", "Bytes the outbox holds on disk."),
    (
        ("outbox", "dropped_total"),
        "counter",
        "exfilwatch_outbox_dropped",
        "Lines the outbox dropped (full).",
    ),
    (
        ("outbox", "disk_errors"),
        "counter",
        "exfilwatch_outbox_disk_errors",
        "Outbox writes or reads that failed.",
    ),
)
# Per pipeline lane: stats key -> (type, metric name, help).
LANE_KEYS: Mapping[str, tuple[str, str, str]] = {
    "queued": ("gauge", "exfilwatch_lane_queued", "Events queued in the lane."),
    "queue_size": ("gauge", "exfilwatch_lane_queue_size", "Capacity of the lane."),
    "high_water": ("gauge", "exfilwatch_lane_high_water", "Most events ever queued in the lane."),
    "dropped_total": ("counter", "exfilwatch_lane_dropped", "Events the full lane dropped."),
    "processed": ("counter", "exfilwatch_lane_processed", "Events the lane delivered."),
}
# Per sink.
SINK_KEYS: Mapping[str, tuple[str, str, str]] = {
    "pending": ("gauge", "exfilwatch_sink_pending", "Lines the sink owes (it is failing)."),
    "errors": ("counter", "exfilwatch_sink_errors", "Failed writes to the sink."),
    "dropped": (
        "counter",
        "exfilwatch_sink_dropped",
        "Owed lines the sink dropped (backlog full).",
    ),
    "delivered": ("counter", "exfilwatch_sink_delivered", "Lines the sink took."),
    "up": ("gauge", "exfilwatch_sink_up", "1 while the sink's last write succeeded."),
}
SINK_KIND_KEYS: Mapping[str, tuple[str, str, str]] = {
    "pending_by_kind": (
        "gauge",
        "exfilwatch_sink_pending_by_kind",
        "Lines the sink owes, by record kind.",
    ),
    "dropped_by_kind": (
        "counter",
        "exfilwatch_sink_dropped_by_kind",
        "Owed lines the sink dropped, by record kind.",
    ),
}
_FAMILIES: Mapping[str, type[GaugeMetricFamily | CounterMetricFamily | UnknownMetricFamily]] = {
    "gauge": GaugeMetricFamily,
    "counter": CounterMetricFamily,
    "unknown": UnknownMetricFamily,
}


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9101` for IPv6) to (address, port), refusing with ValueError any
    address that is not a loopback IP. The endpoint has no authentication, and what it tells
    (which trees are watched, whether events are being lost, when a sink is down) is worth
    knowing to the insider it watches for; a remote Prometheus scrapes through node_exporter's
    textfile or a TLS proxy instead. Host names are refused too: one that resolves elsewhere
    tomorrow would open the port without a config change."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"metrics listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9101")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"metrics listen {listen!r}: {host!r} is not an IP address (use 127.0.0.1 or [::1])"
        ) from None
    if not ip.is_loopback:
        raise ValueError(
            f"metrics listen {listen!r}: {ip} is not a loopback address; the endpoint has no "
            "authentication, so it only listens on 127.0.0.0/8 or ::1 (use the textfile for "
            "node_exporter, or a TLS proxy, to scrape from elsewhere)"
        )
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"metrics listen {listen!r}: port {port} is out of range")
    return str(ip), port


def _label(value: object) -> str:
    """A label value as the exposition should get it. A quote, a backslash or a newline is
    left as it is: the exposition escapes them and a parser gives back the original text.
    Any other character that is not printable (CR, ESC, bidi controls, lone surrogates from a
    name that is not UTF-8) is written as Python escapes it (\\r, \\x1b, \\udcff): a raw CR
    splits the line for some parsers, a surrogate cannot be encoded, and an escape sequence
    would act on the terminal of whoever curls the endpoint."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _at(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


class _Families:
    """The metric families of one scrape, and the stats paths they used (left out of the
    generic fallback)."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.used: set[tuple[str, ...]] = set()

    def add(
        self,
        kind: str,
        name: str,
        doc: str,
        value: Any,
        labels: Mapping[str, object] | None = None,
    ) -> None:
        number = _number(value)
        if number is None:
            return
        labels = labels or {}
        family = self.families.get(name)
        if family is None:
            family = _FAMILIES[kind](name, doc, labels=list(labels))
            self.families[name] = family
        assert isinstance(family, GaugeMetricFamily | CounterMetricFamily | UnknownMetricFamily)
        family.add_metric([_label(v) for v in labels.values()], number)

    def build(self, stats: Mapping[str, Any]) -> None:
        for path, kind, name, doc in SCALARS:
            self.used.add(path)
            self.add(kind, name, doc, _at(stats, path))
        self._alerts(stats)
        self._rules(stats)
        self._cpu(stats)
        self._keyed(stats, ("pipeline", "lanes"), "lane", LANE_KEYS)
        self._sinks(stats)
        self._roots(stats)
        self._caps(stats)
        self._broken(stats)
        self._fallback(stats)

    def _alerts(self, stats: Mapping[str, Any]) -> None:
        self.used |= {("alerts",), ("engine", "alerts")}
        value = stats.get("alerts")
        if _number(value) is None:
            value = _at(stats, ("engine", "alerts"))
        self.add("counter", "exfilwatch_alerts", "Alerts raised since the agent started.", value)

    def _rules(self, stats: Mapping[str, Any]) -> None:
        self.used |= {("ruleset",), ("engine", "rules"), ("version",)}
        ruleset = stats.get("ruleset")
        ruleset = ruleset if isinstance(ruleset, dict) else {}
        rules = ruleset.get("rules")
        if _number(rules) is None:
            rules = _at(stats, ("engine", "rules"))
        self.add("gauge", "exfilwatch_rules", "Rules loaded (single-event and correlation).", rules)
        version = stats.get("version")
        info = InfoMetricFamily(
            "exfilwatch_build",
            "The agent's version and the hash of its loaded rule set.",
            value={
                "version": _label(version if isinstance(version, str) else __version__),
                "ruleset": _label(ruleset.get("hash") or ""),
            },
        )
        self.families["exfilwatch_build"] = info

    def _cpu(self, stats: Mapping[str, Any]) -> None:
        for mode in ("user", "system"):
            path = ("process", f"cpu_{mode}_s")
            self.used.add(path)
            self.add(
                "counter",
                "exfilwatch_cpu_seconds",
                "CPU time of the agent process, by mode.",
                _at(stats, path),
                {"mode": mode},
            )

    def _keyed(
        self,
        stats: Mapping[str, Any],
        path: tuple[str, ...],
        label: str,
        keys: Mapping[str, tuple[str, str, str]],
    ) -> None:
        self.used.add(path)
        items = _at(stats, path)
        if not isinstance(items, dict):
            return
        for item, values in items.items():
            if not isinstance(values, dict):
                continue
            for key, (kind, name, doc) in keys.items():
                self.add(kind, name, doc, values.get(key), {label: item})

    def _sinks(self, stats: Mapping[str, Any]) -> None:
        self._keyed(stats, ("sinks",), "sink", SINK_KEYS)
        sinks = stats.get("sinks")
        if not isinstance(sinks, dict):
            return
        for sink, values in sinks.items():
            if not isinstance(values, dict):
                continue
            for key, (kind, name, doc) in SINK_KIND_KEYS.items():
                by_kind = values.get(key)
                if isinstance(by_kind, dict):
                    for record_kind, n in by_kind.items():
                        self.add(kind, name, doc, n, {"sink": sink, "kind": record_kind})

    def _roots(self, stats: Mapping[str, Any]) -> None:
        self.used.add(("inotify", "roots"))
        roots = _at(stats, ("inotify", "roots"))
        if not isinstance(roots, dict):
            return
        for root, state in roots.items():
            self.add(
                "gauge",
                "exfilwatch_watch_root",
                "1 for each watched root, labelled with its state (watching, missing...).",
                1,
                {"root": root, "state": state},
            )

    def _caps(self, stats: Mapping[str, Any]) -> None:
        self.used.add(("caps_hit",))
        caps = stats.get("caps_hit")
        if not isinstance(caps, dict):
            return
        for cap, hits in caps.items():
            self.add("counter", "exfilwatch_cap_hits", "Times a limit was hit.", hits, {"cap": cap})

    def _broken(self, stats: Mapping[str, Any]) -> None:
        """A component whose stats() raised: the agent puts {"error": <exception name>}."""
        for component, values in stats.items():
            if isinstance(values, dict) and list(values) == ["error"]:
                self.add(
                    "gauge",
                    "exfilwatch_component_stats_failed",
                    "1 for a component whose counters could not be read.",
                    1,
                    {"component": component, "error": values["error"]},
                )

    def _fallback(self, stats: Mapping[str, Any]) -> None:
        """Every numeric leaf no metric above took, as exfilwatch_component_value{component,
        key}: a counter added to a component shows up without a change here. Typed unknown,
        because nothing says whether it is a counter or a gauge."""
        leaves: list[tuple[str, str, float]] = []
        self._leaves(stats, (), leaves)
        name = "exfilwatch_component_value"
        doc = "A component's counter or gauge that has no metric of its own (see stats())."
        for component, key, value in leaves[:FALLBACK_MAX]:
            self.add("unknown", name, doc, value, {"component": component, "key": key})
        if len(leaves) > FALLBACK_MAX:
            self.add(
                "gauge",
                "exfilwatch_component_values_omitted",
                f"Numeric stats left out past {FALLBACK_MAX} component_value series.",
                len(leaves) - FALLBACK_MAX,
            )

    def _leaves(
        self, node: Mapping[str, Any], path: tuple[str, ...], out: list[tuple[str, str, float]]
    ) -> None:
        for key, value in node.items():
            here = (*path, str(key))
            if here in self.used:
                continue
            if isinstance(value, dict):
                if len(here) < _FALLBACK_DEPTH and list(value) != ["error"]:
                    self._leaves(value, here, out)
                continue
            number = _number(value)
            if number is None:
                continue
            if len(here) == 1:
                out.append(("agent", here[0], number))
            else:
                out.append((here[0], ".".join(here[1:]), number))


class StatsCollector(Collector):
    """Calls stats() at each scrape and maps it to metrics. A stats() that raises (or returns
    something other than a dict) gives `exfilwatch_up 0` and the error counter, never a failed
    scrape: the scrape is how one learns the agent is unwell."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._lock = threading.Lock()
        self.scrapes = 0
        self.errors = 0
        self.stopped = False  # set by Metrics.stop(): the agent is down, whatever stats() says
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        families: list[Metric] = []
        up = 0.0
        if not self.stopped:
            try:
                data = self._call()
                built = _Families()
                built.build(data)
                families = list(built.families.values())
                up = 1.0
            except Exception as exc:
                self._failed(exc)
            else:
                self._failing = False
        with self._lock:
            self.scrapes += 1
            errors = self.errors
        yield GaugeMetricFamily("exfilwatch_up", "1 while the agent runs and reports.", up)
        yield CounterMetricFamily(
            "exfilwatch_stats_errors", "Scrapes whose stats() call failed.", errors
        )
        yield from families

    def _call(self) -> dict[str, Any]:
        data = self._stats()
        if not isinstance(data, dict):
            raise TypeError(f"stats() returned {type(data).__name__}, not a dict")
        return data

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            first = not self._failing
            self._failing = True
        if first:  # once per outage, not once per scrape
            log.error("metrics_stats_failed", error=f"{type(exc).__name__}: {exc}")


class Metrics:
    """The agent's stats() as Prometheus metrics, served on loopback HTTP (`listen`) and/or
    written for node_exporter's textfile collector (`textfile`, a path ending in .prom).

    `listen` and `textfile` are checked here (ValueError), so a bad config fails before
    anything starts. stop() writes the textfile once more with exfilwatch_up 0, so a stopped
    agent does not look healthy in node_exporter until someone notices the file's age."""

    def __init__(
        self,
        stats: Stats,
        *,
        textfile: str | None = None,
        listen: str | None = None,
    ) -> None:
        if textfile is not None and not textfile.endswith(".prom"):
            raise ValueError(
                f"metrics textfile {textfile!r}: node_exporter reads only files ending in .prom"
            )
        self._textfile = textfile
        self._listen = parse_listen(listen) if listen is not None else None
        self.collector = StatsCollector(stats)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self._writes = 0
        self._write_errors = 0

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the endpoint listens on once started (the real port when 0 was asked)."""
        return self._address

    def start(self) -> None:
        """Starts the HTTP endpoint when `listen` was given (a daemon thread); OSError when the
        port cannot be bound."""
        with self._lock:
            if self._listen is None or self._server is not None:
                return
            self.collector.stopped = False
            host, port = self._listen
            server, thread = start_http_server(port, addr=host, registry=self.registry)
            thread.name = "exfilwatch-metrics"
            self._server, self._thread = server, thread
            self._address = (host, int(server.server_address[1]))
            log.info("metrics_listening", address=host, port=self._address[1])

    def stop(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            self.collector.stopped = True
        if server is not None and thread is not None:
            server.shutdown()
            server.server_close()
            thread.join()
        if self._textfile is None:
            return
        try:
            self.write_textfile()
        except OSError as exc:
            error = str(exc)
        else:
            return
        log.error("metrics_textfile_failed", path=self._textfile, error=error)

    def write_textfile(self) -> None:
        """Writes the metrics to `textfile` atomically, mode 0644 (nothing without one). Not
        prometheus_client's write_to_textfile: its temporary file takes the process umask
        (0600 under a 077 umask, unreadable to node_exporter until a chmod after the rename)
        and a predictable name; mkstemp (O_EXCL, random name) plus fchmod before the rename
        gives node_exporter only ever a whole, readable file. The temporary name does not
        end in .prom, so the collector never reads it half-written. OSError is raised for
        the caller to report, after the temporary file is removed."""
        path = self._textfile
        if path is None:
            return
        data = generate_latest(self.registry)
        directory = os.path.dirname(path) or "."
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".exfilwatch-metrics.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), TEXTFILE_MODE)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with self._lock:
                self._write_errors += 1
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        with self._lock:
            self._writes += 1

    def stats(self) -> dict[str, Any]:
        """The exporter's own counters, for the heartbeat."""
        with self._lock:
            address = self._address
            out: dict[str, Any] = {
                "listening": f"{address[0]}:{address[1]}" if self._server and address else None,
                "textfile": self._textfile,
                "textfile_writes": self._writes,
                "textfile_errors": self._write_errors,
            }
        out["scrapes"] = self.collector.scrapes
        out["stats_errors"] = self.collector.errors
        return out
