"""Agent configuration: load, validate in one pass with located problems, apply defaults."""

from __future__ import annotations

import datetime as dt
import math
import os
import shlex
import sys
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from agent.diagnostics import (
    ERROR,
    WARNING,
    Problem,
    ProblemsError,
    at,
    check_permissions,
    compose_yaml,
    decode_utf8,
    errors_only,
    nearest,
    node_value,
)
from agent.risk import DAYS, DEFAULT_BANDS, DEFAULT_WEIGHTS, RiskSettings, WorkingHours
from agent.units import parse_duration

SYSTEM_CONFIG = "/etc/exfilwatch/agent.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = REPO_ROOT / "config" / "agent.yaml"


def data_dir() -> Path:
    """Where the shipped rules (rules/) and default config (config/) are: the checkout for a
    run from it or an editable install, else <prefix>/share/exfilwatch, where the wheel puts
    them (pyproject.toml, data-files)."""
    if (REPO_ROOT / "rules").is_dir() and REPO_CONFIG.is_file():
        return REPO_ROOT
    import site

    # pip install --user puts data files under the user base, not the interpreter's prefix.
    for prefix in (sys.prefix, site.getuserbase()):
        candidate = Path(prefix) / "share" / "exfilwatch"
        if (candidate / "rules").is_dir():
            return candidate
    return Path(sys.prefix) / "share" / "exfilwatch"


SENSITIVITY_LEVELS = ("low", "medium", "high", "critical")
SOURCES = ("auto", "inotify", "watchdog", "polling")
SINK_TYPES = ("stdout", "file", "syslog", "http")
SYSLOG_PROTOCOLS = ("udp", "tcp", "tls", "relp")
HTTP_FORMATS = ("json", "hec", "bulk")
STDOUT_FORMATS = ("auto", "json", "pretty")
# Alert levels (the rules' scale) a sink's min_severity names; health records compare by
# log.level: info 1, warning 47, error 73.
SEVERITY_LEVELS = {"informational": 1, "low": 21, "medium": 47, "high": 73, "critical": 99}
OUTBOX_SYNC = ("full", "normal")
RECORD_KINDS = ("alert", "health", "event")
MAX_CONFIG_BYTES = 1 << 20
HOME_DEPTH_MAX = 16
# Hidden trees in a home that browsers, editors and toolchains rewrite all day: watching them
# would spend the watch budget and the staging lane on noise. A pattern without '/' is a
# component anywhere; one with '/' is anchored at the watched place (see agent/sources/paths.py).
LOCATION_EXCLUDES = (
    ".cache",
    ".mozilla",
    ".config/google-chrome",
    ".config/chromium",
    ".config/Code",
    ".vscode-server",
    ".npm",
    ".cargo",
    ".rustup",
    ".gradle",
    ".m2",
    ".pyenv",
    ".local/share/Trash",
    ".thumbnails",
)


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """One directory tree to watch: a tagged tree from the config, or a destination the agent
    found itself (removable media, cloud-sync folder, staging area)."""

    path: str
    tags: tuple[str, ...] = ()
    sensitivity: str | None = None
    recursive: bool = True
    exclude: tuple[str, ...] = ()
    location: str = "tagged"  # tagged | removable | cloud_sync | staging | network_share | home
    provider: str | None = None  # sync client or medium label
    max_depth: int | None = None  # directories deeper than this below the path are not watched
    max_dirs: int | None = None  # watch budget for this tree; reaching it is reported


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """Where records go and which kinds of record it takes."""

    type: str
    path: str | None = None
    records: frozenset[str] = frozenset({"alert", "health"})
    min_severity: int = 0  # alerts and health below it are not sent (events always are)
    format: str | None = None  # stdout: auto | json | pretty; http: json | hec | bulk
    address: str | None = None  # syslog: HOST:PORT
    protocol: str = "udp"  # syslog: udp | tcp | tls
    url: str | None = None  # http
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    timeout: float = 10.0
    facility: str = "local0"  # syslog
    index: str | None = None  # http bulk and hec
    sourcetype: str = "exfilwatch"  # http hec
    # Credentials: from a file (0600/0400, the agent's) or the environment, never inline.
    token_file: str | None = None
    token_env: str | None = None
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    max_bytes: int | None = None  # file: rotate past this size
    keep: int = 5  # file: rotated files kept
    fsync: bool = True  # file: fdatasync each batch of alerts before the outbox lets it go

    @property
    def label(self) -> str:
        """How messages name the sink (never a credential)."""
        where = self.path or self.address or _redact_url(self.url)
        return f"{self.type}:{where}" if where else self.type


def _redact_url(url: str | None) -> str | None:
    """scheme://host[:port]/path: user info and the query (which may carry a token) dropped."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        host = u.hostname or ""
        port = f":{u.port}" if u.port else ""
    except ValueError:
        return "(invalid url)"
    return f"{u.scheme}://{host}{port}{u.path}"


@dataclass(frozen=True, slots=True)
class WatchlistSettings:
    """The departure watchlist (docs/offboarding.md): defaults for `watchlist add` and
    `import`, and how HR's e-mail addresses become local user names."""

    days_before: int = 90  # the watch starts this many days before the notice
    days_after: int = 30  # and ends this many days after the last working day
    user_map: tuple[tuple[str, str], ...] = ()  # (e-mail in lower case, user name)
    local_part: bool = True  # an unmapped alice@corp.example is the local user alice
    check_interval: float = 1.0  # how often the running agent looks for changes


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """The durable outbox under state_dir (see docs/sinks.md)."""

    enabled: bool = True
    max_records: int = 1_000_000
    max_bytes: int = 512 * 1024 * 1024
    sync: str = "full"  # full: fsync each commit; normal: survive a crash, not a power loss


@dataclass(frozen=True, slots=True)
class InotifySettings:
    """Kernel settings the agent raises when it runs as root (never lowers)."""

    max_queued_events: int = 1_048_576
    max_user_watches: int = 1_048_576
    apply_sysctl: bool = True


@dataclass(frozen=True, slots=True)
class LocationSettings:
    """Destinations the agent finds and watches by itself (see README, "Destinations")."""

    enabled: bool = True
    removable_patterns: tuple[str, ...] = (
        "/media/*",
        "/media/*/*",
        "/run/media/*/*",
        "/mnt/*",
        "/Volumes/*",
    )
    cloud_sync: bool = True
    staging_dirs: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108
    home_roots: tuple[str, ...] = ("/home", "/Users", "/root")
    mount_check_interval: float = 1.0
    # Directory levels of a home that are watched; a hidden directory at any of them is staging.
    home_depth: int = 4
    exclude: tuple[str, ...] = LOCATION_EXCLUDES  # subtrees of found places never watched


@dataclass(frozen=True, slots=True)
class LineageSettings:
    enabled: bool = True
    max_files: int = 200_000
    hash_max_bytes: int = 16 * 1024 * 1024
    io_budget_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EnrichmentSettings:
    """Content checks (hashing, sniffing, archive listing) off the event path, bounded in
    queue, delay, I/O and CPU (see README, "Destinations")."""

    queue_size: int = 10_000  # events waiting for content checks, all users together
    per_user_queue: int = 2_000  # one file owner's share of queue_size
    max_delay: float = 1.0  # then the event goes on unenriched (exfilwatch.enrichment.skipped)
    io_budget_bytes: int = 64 * 1024 * 1024  # bytes read per second, all files together
    cpu_budget: float = 0.25  # CPU-seconds per second
    # Encoded, mailed and split copies are decoded to find their origin: bytes per file.
    decode_max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProcessSettings:
    """Process-started events and attribution of file events (see README, "Who did it")."""

    enabled: bool = True
    interval: float = 0.5
    attribution: bool = True
    # auto | on | off. Off by default: exact pids cost ~8 µs of CPU per file access on the
    # mounts holding the tagged trees (measured, bench/attribution.py), over the 1% budget
    # on a busy machine; `auto` buys 89% exact attribution for that.
    fanotify: str = "off"
    # auto | on | off: who created, deleted or renamed a file, from fanotify directory-entry
    # events on the filesystems holding the trees (root; about 1 us of kernel time per
    # creation or deletion anywhere on them, measured): on by default where it can run.
    fanotify_dirs: str = "auto"
    # auto | kernel | poll: where process starts come from. kernel: the netlink process
    # connector (root; every exec, at once); poll: reading the table every `interval`;
    # auto: the connector when it can be used, else polling.
    source: str = "auto"


@dataclass(frozen=True, slots=True)
class TrustedDestination:
    """A sanctioned destination (README, "Trusted destinations"): exactly one of a path (a
    directory and everything below it), a removable device (by filesystem label or serial), a
    network share (its mount source, //server/share or server:/export) or a sync provider."""

    reason: str
    path: str | None = None
    label: str | None = None
    serial: str | None = None
    share: str | None = None
    provider: str | None = None

    @property
    def name(self) -> str:
        for kind in ("path", "label", "serial", "share", "provider"):
            value = getattr(self, kind)
            if value is not None:
                return f"{kind}:{value}"
        return "?"


@dataclass(frozen=True, slots=True)
class Config:
    """The validated agent configuration."""

    source_file: str
    watch: tuple[WatchSpec, ...]
    rules: tuple[str, ...] = ()
    # quarantine: a rule with errors is left out (rules_rejected) and the rest run; fatal: any
    # error refuses the whole set (at start the agent stops, on reload the old set stays).
    rule_errors: str = "quarantine"
    sinks: tuple[SinkSpec, ...] = (SinkSpec("stdout"),)
    state_dir: str = "/var/lib/exfilwatch"
    source: str = "auto"
    queue_size: int = 50_000  # the tagged lane; never shed
    egress_queue_size: int = 20_000  # removable media, sync folders, shares; shed after staging
    staging_queue_size: int = 20_000  # temp dirs and homes; shed first
    marker_name: str = ".exfilwatch.yaml"
    heartbeat_interval: float = 60.0
    rescan_max_entries: int = 200_000
    root_check_interval: float = 5.0
    rules_check_interval: float = 1.0
    inotify: InotifySettings = field(default_factory=InotifySettings)
    locations: LocationSettings = field(default_factory=LocationSettings)
    lineage: LineageSettings = field(default_factory=LineageSettings)
    processes: ProcessSettings = field(default_factory=ProcessSettings)
    enrichment: EnrichmentSettings = field(default_factory=EnrichmentSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    watchlist: WatchlistSettings = field(default_factory=WatchlistSettings)
    # None: events carry no off-hours flag (set it to score off-hours activity).
    working_hours: WorkingHours | None = None
    trusted: tuple[TrustedDestination, ...] = ()
    risk: RiskSettings = field(default_factory=RiskSettings)
    pseudonymize: bool = False  # privacy.pseudonymize: keyed pseudonyms for user names
    # Prometheus metrics: a node_exporter textfile and/or a loopback endpoint HOST:PORT.
    metrics_textfile: str | None = None
    metrics_listen: str | None = None


def default_config_path() -> str:
    """`/etc/exfilwatch/agent.yaml` when present, else the shipped `config/agent.yaml` (the
    checkout's, or the installed one under <prefix>/share/exfilwatch), else one in the
    working directory's `config/`."""
    shipped = data_dir() / "config" / "agent.yaml"
    for candidate in (Path(SYSTEM_CONFIG), shipped, Path.cwd() / "config" / "agent.yaml"):
        if candidate.exists():
            return str(candidate)
    return SYSTEM_CONFIG


class _Checker:
    """Walks a YAML node tree, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.base = Path(file).resolve().parent
        self.problems: list[Problem] = []

    def add(
        self,
        node: yaml.Node | None,
        code: str,
        message: str,
        hint: str = "",
        severity: str = ERROR,
    ) -> None:
        p = at(self.file, node, code, message, hint)
        if severity != ERROR:
            p = Problem(p.file, p.line, p.col, p.code, p.message, p.hint, severity)
        self.problems.append(p)

    def mapping(
        self, node: yaml.Node, allowed: tuple[str, ...], what: str
    ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.add(node, "CFG_TYPE", f"{what} must be a mapping", f"write {what} as 'key: value'")
            return None
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.add(key_node, "CFG_TYPE", f"keys in {what} must be strings")
                continue
            if key in out:
                self.add(key_node, "CFG_DUPLICATE_KEY", f"'{key}' is given twice in {what}")
                continue
            if key not in allowed:
                self.add(
                    key_node,
                    "CFG_UNKNOWN_KEY",
                    f"unknown key '{key}' in {what}",
                    nearest(key, allowed) or f"allowed: {', '.join(allowed)}",
                )
                continue
            out[key] = value_node
        return out

    def scalar(self, node: yaml.Node, kind: type, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.add(node, "CFG_TYPE", f"{what} must be a single {kind.__name__}")
            return None
        value = node_value(node)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.add(node, "CFG_TYPE", f"{what} must be an integer, not {value!r}")
            return None
        if kind is bool and not isinstance(value, bool):
            self.add(node, "CFG_TYPE", f"{what} must be true or false, not {value!r}")
            return None
        if kind is str and not isinstance(value, str):
            self.add(node, "CFG_TYPE", f"{what} must be a string", "quote it")
            return None
        return value

    def positive_int(
        self, node: yaml.Node, what: str, minimum: int = 1, maximum: int | None = None
    ) -> int | None:
        value = self.scalar(node, int, what)
        if value is not None and value < minimum:
            self.add(node, "CFG_VALUE", f"{what} must be at least {minimum}")
            return None
        if value is not None and maximum is not None and value > maximum:
            self.add(node, "CFG_VALUE", f"{what} must be at most {maximum}")
            return None
        return value if isinstance(value, int) else None

    def fraction(self, node: yaml.Node, what: str) -> float | None:
        """A number in (0, 1]: a share of something, such as a CPU."""
        if not isinstance(node, yaml.ScalarNode):
            self.add(node, "CFG_TYPE", f"{what} must be a single number", "e.g. 0.25")
            return None
        value = node_value(node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(node, "CFG_TYPE", f"{what} must be a number, not {value!r}", "e.g. 0.25")
            return None
        if not 0 < value <= 1:  # also refuses .nan and .inf
            self.add(node, "CFG_VALUE", f"{what} must be more than 0 and at most 1")
            return None
        return float(value)

    def duration(self, node: yaml.Node, what: str) -> float | None:
        if not isinstance(node, yaml.ScalarNode):
            self.add(node, "CFG_TYPE", f"{what} must be a duration")
            return None
        try:
            seconds = parse_duration(node_value(node))
        except (ValueError, OverflowError) as exc:  # OverflowError: an int past float range
            self.add(node, "CFG_DURATION", f"{what}: {exc}")
            return None
        if not math.isfinite(seconds):
            self.add(node, "CFG_DURATION", f"{what} must be a finite duration")
            return None
        if seconds <= 0:
            self.add(node, "CFG_VALUE", f"{what} must be longer than zero")
            return None
        return seconds

    def string_list(self, node: yaml.Node, what: str) -> tuple[str, ...] | None:
        if isinstance(node, yaml.ScalarNode) and node_value(node) is None:
            return ()
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, "CFG_TYPE", f"{what} must be a list", f"write {what}: [a, b]")
            return None
        out = []
        for item in node.value:
            value = self.scalar(item, str, f"each entry of {what}")
            if isinstance(value, str):
                if not value:
                    self.add(item, "CFG_VALUE", f"an entry of {what} is empty")
                    continue
                out.append(value)
        return tuple(out)

    def path(self, node: yaml.Node, what: str) -> str | None:
        value = self.scalar(node, str, what)
        if not isinstance(value, str):
            return None
        if not value:
            self.add(node, "CFG_VALUE", f"{what} is empty")
            return None
        if "\x00" in value:
            self.add(node, "CFG_VALUE", f"{what} contains a NUL byte")
            return None
        return resolve_path(value, self.base)


def resolve_path(value: str, base: Path) -> str:
    """`~` is the home of the user running the agent; relative paths are from the config's dir."""
    expanded = os.path.expanduser(value)
    if not os.path.isabs(expanded):
        expanded = str(base / expanded)
    return os.path.normpath(expanded)


_TOP_KEYS = (
    "watch",
    "rules",
    "sinks",
    "state_dir",
    "source",
    "queue_size",
    "egress_queue_size",
    "staging_queue_size",
    "marker_name",
    "heartbeat_interval",
    "rescan_max_entries",
    "root_check_interval",
    "rules_check_interval",
    "inotify",
    "locations",
    "lineage",
    "processes",
    "enrichment",
    "outbox",
    "metrics",
    "watchlist",
    "working_hours",
    "risk",
    "privacy",
    "trusted",
    "rule_errors",
)
_TRUSTED_KEYS = ("path", "device", "share", "provider", "reason")
_DEVICE_KEYS = ("label", "serial")
_PRIVACY_KEYS = ("pseudonymize",)
_WORKING_HOURS_KEYS = ("days", "start", "end", "timezone")
_RISK_KEYS = ("weights", "bands")
_WATCHLIST_KEYS = ("days_before", "days_after", "user_map", "local_part", "check_interval")
_OUTBOX_KEYS = ("enabled", "max_records", "max_bytes", "sync")
_METRICS_KEYS = ("textfile", "listen")
_PROCESS_KEYS = ("enabled", "interval", "attribution", "fanotify", "fanotify_dirs", "source")
_LOCATION_KEYS = (
    "enabled",
    "removable_patterns",
    "cloud_sync",
    "staging_dirs",
    "home_roots",
    "mount_check_interval",
    "home_depth",
    "exclude",
)
_LINEAGE_KEYS = ("enabled", "max_files", "hash_max_bytes", "io_budget_bytes")
_ENRICHMENT_KEYS = (
    "queue_size",
    "per_user_queue",
    "max_delay",
    "io_budget_bytes",
    "cpu_budget",
    "decode_max_bytes",
)
_WATCH_KEYS = ("path", "tags", "sensitivity", "recursive", "exclude")
_SINK_KEYS = (
    "type",
    "path",
    "records",
    "min_severity",
    "format",
    "address",
    "protocol",
    "url",
    "ca_file",
    "cert_file",
    "key_file",
    "verify",
    "timeout",
    "facility",
    "index",
    "sourcetype",
    "token_file",
    "token_env",
    "username",
    "password_file",
    "password_env",
    "max_bytes",
    "keep",
    "fsync",
)
# Which keys each sink type takes besides type, records and min_severity.
_SINK_TYPE_KEYS = {
    "stdout": ("format",),
    "file": ("path", "max_bytes", "keep", "fsync"),
    "syslog": (
        "address",
        "protocol",
        "ca_file",
        "cert_file",
        "key_file",
        "verify",
        "timeout",
        "facility",
    ),
    "http": (
        "url",
        "format",
        "ca_file",
        "cert_file",
        "key_file",
        "verify",
        "timeout",
        "index",
        "sourcetype",
        "token_file",
        "token_env",
        "username",
        "password_file",
        "password_env",
    ),
}
_INOTIFY_KEYS = ("max_queued_events", "max_user_watches", "apply_sysctl")


def _watch_entry(c: _Checker, node: yaml.Node, index: int) -> WatchSpec | None:
    what = f"watch[{index}]"
    m = c.mapping(node, _WATCH_KEYS, what)
    if m is None:
        return None
    if "path" not in m:
        c.add(node, "CFG_REQUIRED", f"{what} needs a 'path'", "path: /srv/rnd/chip-design")
        return None
    path = c.path(m["path"], f"{what}.path")
    tags = c.string_list(m["tags"], f"{what}.tags") if "tags" in m else ()
    sensitivity = None
    if "sensitivity" in m:
        sensitivity = c.scalar(m["sensitivity"], str, f"{what}.sensitivity")
        if isinstance(sensitivity, str) and sensitivity not in SENSITIVITY_LEVELS:
            c.add(
                m["sensitivity"],
                "CFG_VALUE",
                f"unknown sensitivity '{sensitivity}'",
                nearest(sensitivity, SENSITIVITY_LEVELS)
                or f"one of {', '.join(SENSITIVITY_LEVELS)}",
            )
            sensitivity = None
    recursive = c.scalar(m["recursive"], bool, f"{what}.recursive") if "recursive" in m else True
    exclude = _excludes(c, m["exclude"], f"{what}.exclude") if "exclude" in m else ()
    if path is None or tags is None or exclude is None or not isinstance(recursive, bool):
        return None
    if path != "/" and not os.path.isdir(path):
        if os.path.exists(path):
            c.add(m["path"], "CFG_VALUE", f"{what}.path is not a directory: {path}")
            return None
        c.add(
            m["path"],
            "CFG_WATCH_PATH_MISSING",
            f"{what}.path does not exist yet: {path}",
            "it will be watched as soon as it appears",
            severity=WARNING,
        )
    return WatchSpec(path, tags, sensitivity, recursive, exclude)


def _sink_entry(c: _Checker, node: yaml.Node, index: int) -> SinkSpec | None:
    what = f"sinks[{index}]"
    m = c.mapping(node, _SINK_KEYS, what)
    if m is None:
        return None
    if "type" not in m:
        c.add(node, "CFG_REQUIRED", f"{what} needs a 'type'", f"one of {', '.join(SINK_TYPES)}")
        return None
    kind = c.scalar(m["type"], str, f"{what}.type")
    if isinstance(kind, str) and kind not in SINK_TYPES:
        c.add(
            m["type"],
            "CFG_UNKNOWN_SINK",
            f"unknown sink type '{kind}'",
            nearest(kind, SINK_TYPES) or f"one of {', '.join(SINK_TYPES)}",
        )
        return None
    if not isinstance(kind, str):
        return None
    takes = _SINK_TYPE_KEYS[kind]
    for key, value_node in m.items():
        if key not in ("type", "records", "min_severity") and key not in takes:
            c.add(
                value_node,
                "CFG_VALUE",
                f"{what}: a {kind} sink takes no '{key}'",
                f"remove '{key}' (a {kind} sink takes: {', '.join(takes) or 'no options'})",
            )
    path = None
    if kind == "file":
        if "path" not in m:
            c.add(node, "CFG_REQUIRED", f"{what} (file) needs a 'path'")
            return None
        path = c.path(m["path"], f"{what}.path")
        if path is not None:
            _sink_file(c, m["path"], path, what)
    records: frozenset[str] = frozenset({"alert", "health"})
    if "records" in m:
        given = c.string_list(m["records"], f"{what}.records")
        if given is not None:
            bad = [r for r in given if r not in RECORD_KINDS]
            for r in bad:
                c.add(
                    m["records"],
                    "CFG_VALUE",
                    f"unknown record kind '{r}' in {what}.records",
                    nearest(r, RECORD_KINDS) or f"any of {', '.join(RECORD_KINDS)}",
                )
            if not given:
                c.add(m["records"], "CFG_VALUE", f"{what}.records is empty")
            records = frozenset(r for r in given if r in RECORD_KINDS)
    kw: dict[str, Any] = {}
    if "min_severity" in m:
        level = _choice(c, m["min_severity"], f"{what}.min_severity", tuple(SEVERITY_LEVELS))
        if level is not None:
            kw["min_severity"] = SEVERITY_LEVELS[level]
    ok = _sink_options(c, node, m=m, kind=kind, what=what, kw=kw)
    if kind == "file" and path is None:
        return None
    return SinkSpec(kind, path, records, **kw) if ok else None


# The level of event_loss and the other records of what the agent could not see or send.
_LOSS_SEVERITY = SEVERITY_LEVELS["high"]  # log.level error (LEVEL_SEVERITY in agent.sinks)


def _health_reaches_a_sink(c: _Checker, node: yaml.Node, sinks: Sequence[SinkSpec]) -> None:
    """A warning when no sink would write the agent's losses (event_loss, a tree no longer
    watched, a sink that failed): the agent would be blind without anyone knowing."""
    health = [s for s in sinks if "health" in s.records]
    if not health:
        c.add(
            node,
            "CFG_NO_HEALTH_SINK",
            "no sink takes health records: lost events, trees no longer watched and failing "
            "sinks would be reported nowhere",
            "add health to a sink's records, e.g. records: [alert, health]",
            severity=WARNING,
        )
    elif all(s.min_severity > _LOSS_SEVERITY for s in health):
        c.add(
            node,
            "CFG_NO_HEALTH_SINK",
            "every sink that takes health records has a min_severity above error: lost "
            "events (event_loss) would be reported nowhere",
            "set min_severity: high or lower on one of them",
            severity=WARNING,
        )


def _sink_options(
    c: _Checker,
    node: yaml.Node,
    *,
    m: dict[str, yaml.Node],
    kind: str,
    what: str,
    kw: dict[str, Any],
) -> bool:
    """The type-specific keys of a sink into `kw`; False when a required one is missing."""
    before = len(c.problems)
    if kind == "stdout" and "format" in m:
        kw["format"] = _choice(c, m["format"], f"{what}.format", STDOUT_FORMATS)
    if kind == "file":
        if "max_bytes" in m:
            kw["max_bytes"] = c.positive_int(m["max_bytes"], f"{what}.max_bytes", 4096)
        if "keep" in m:
            kw["keep"] = c.positive_int(m["keep"], f"{what}.keep", 1, 1000)
        if "fsync" in m:
            kw["fsync"] = c.scalar(m["fsync"], bool, f"{what}.fsync")
    if kind == "syslog":
        if "address" not in m:
            c.add(node, "CFG_REQUIRED", f"{what} (syslog) needs an 'address'", "HOST:PORT")
            return False
        kw["address"] = _address(c, m["address"], f"{what}.address")
        if "protocol" in m:
            kw["protocol"] = _choice(c, m["protocol"], f"{what}.protocol", SYSLOG_PROTOCOLS)
        if "facility" in m:
            kw["facility"] = _choice(c, m["facility"], f"{what}.facility", SYSLOG_FACILITIES)
    if kind == "http":
        if "url" not in m:
            c.add(node, "CFG_REQUIRED", f"{what} (http) needs a 'url'")
            return False
        kw["url"] = _url(c, m["url"], f"{what}.url")
        if "format" in m:
            kw["format"] = _choice(c, m["format"], f"{what}.format", HTTP_FORMATS)
        for key in ("index", "sourcetype", "username", "token_env", "password_env"):
            if key in m:
                kw[key] = c.scalar(m[key], str, f"{what}.{key}")
        for key in ("token_file", "password_file"):
            if key in m:
                kw[key] = c.path(m[key], f"{what}.{key}")
                if kw[key] is not None:
                    _secret_file(c, m[key], kw[key], f"{what}.{key}")
        for env in ("token_env", "password_env"):
            name = kw.get(env)
            if isinstance(name, str) and name not in os.environ:
                c.add(
                    m[env],
                    "CFG_SECRET_MISSING",
                    f"{what}.{env}: the environment has no {name}",
                    f"set {name} in the agent's environment (e.g. systemd EnvironmentFile=)",
                    severity=WARNING,
                )
        if kw.get("format") == "hec" and not ("token_file" in kw or "token_env" in kw):
            c.add(
                node,
                "CFG_REQUIRED",
                f"{what}: Splunk HEC needs a token",
                "token_file: /etc/exfilwatch/hec.token (mode 0600), or token_env",
            )
        if ("password_file" in kw or "password_env" in kw) and "username" not in kw:
            c.add(node, "CFG_REQUIRED", f"{what}: a password needs a 'username'")
    if kind in ("syslog", "http"):
        for key in ("ca_file", "cert_file", "key_file"):
            if key in m:
                kw[key] = c.path(m[key], f"{what}.{key}")
                if kw[key] is not None and not os.path.isfile(kw[key]):
                    c.add(m[key], "CFG_VALUE", f"{what}.{key}: no such file {kw[key]}")
        if "key_file" in kw and kw["key_file"] is not None:
            _secret_file(c, m["key_file"], kw["key_file"], f"{what}.key_file")
        if "verify" in m:
            kw["verify"] = c.scalar(m["verify"], bool, f"{what}.verify")
            if kw["verify"] is False:
                c.add(
                    m["verify"],
                    "CFG_TLS_UNVERIFIED",
                    f"{what}.verify is false: anyone on the path can read or forge alerts",
                    "give the collector's CA with ca_file instead",
                    severity=WARNING,
                )
        if "timeout" in m:
            kw["timeout"] = c.duration(m["timeout"], f"{what}.timeout")
    return len(errors_only(c.problems[before:])) == 0 and all(v is not None for v in kw.values())


def _trusted(c: _Checker, node: yaml.Node) -> tuple[TrustedDestination, ...] | None:
    if not isinstance(node, yaml.SequenceNode):
        c.add(node, "CFG_TYPE", "trusted must be a list of destinations", "- path: /backup/rnd")
        return None
    out: list[TrustedDestination] = []
    ok = True
    for i, item in enumerate(node.value):
        what = f"trusted[{i}]"
        m = c.mapping(item, _TRUSTED_KEYS, what)
        if m is None:
            ok = False
            continue
        kinds = [k for k in ("path", "device", "share", "provider") if k in m]
        if len(kinds) != 1:
            c.add(
                item,
                "CFG_VALUE",
                f"{what} needs exactly one of path, device, share, provider",
                "e.g. path: /backup/rnd, device: {label: BACKUP-01}, share: //nas/rnd, "
                "provider: onedrive",
            )
            ok = False
            continue
        reason = c.scalar(m["reason"], str, f"{what}.reason") if "reason" in m else None
        if not reason:
            c.add(
                item,
                "CFG_REQUIRED",
                f"{what} needs a 'reason' (why this destination is sanctioned)",
                "reason: nightly backup, ticket INC-1234",
            )
            ok = False
            continue
        kind = kinds[0]
        kw: dict[str, Any] = {}
        if kind == "path":
            kw["path"] = c.path(m["path"], f"{what}.path")
        elif kind == "device":
            d = c.mapping(m["device"], _DEVICE_KEYS, f"{what}.device")
            if d is None or len(d) != 1:
                if d is not None:
                    c.add(m["device"], "CFG_VALUE", f"{what}.device needs label or serial")
                ok = False
                continue
            ((key, value),) = d.items()
            kw[key] = c.scalar(value, str, f"{what}.device.{key}")
        else:
            kw[kind] = c.scalar(m[kind], str, f"{what}.{kind}")
            if kind == "provider" and isinstance(kw[kind], str):
                kw[kind] = kw[kind].lower()
        if any(not isinstance(v, str) or not v for v in kw.values()):
            ok = False
            continue
        out.append(TrustedDestination(reason, **kw))
    return tuple(out) if ok else None


def _working_hours(c: _Checker, node: yaml.Node) -> WorkingHours | None:
    m = c.mapping(node, _WORKING_HOURS_KEYS, "working_hours")
    if m is None:
        return None
    kw: dict[str, Any] = {}
    before = len(c.problems)
    if "days" in m:
        days = c.string_list(m["days"], "working_hours.days")
        if days is not None:
            for d in days:
                if d not in DAYS:
                    c.add(
                        m["days"],
                        "CFG_VALUE",
                        f"unknown day '{d}' in working_hours.days",
                        nearest(d, DAYS) or f"any of {', '.join(DAYS)}",
                    )
            kw["days"] = tuple(d for d in DAYS if d in days)
    for key in ("start", "end"):
        if key in m:
            text = c.scalar(m[key], str, f"working_hours.{key}")
            try:
                kw[key] = dt.time.fromisoformat(text) if isinstance(text, str) else None
            except ValueError:
                kw[key] = None
            if kw[key] is None:
                c.add(m[key], "CFG_VALUE", f"working_hours.{key} must be a time", 'e.g. "08:00"')
    if "timezone" in m:
        zone = c.scalar(m["timezone"], str, "working_hours.timezone")
        if isinstance(zone, str):
            try:
                zoneinfo.ZoneInfo(zone)
                kw["timezone"] = zone
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                c.add(
                    m["timezone"],
                    "CFG_VALUE",
                    f"unknown time zone '{zone}'",
                    "an IANA name such as Europe/Berlin or America/New_York",
                )
    if len(c.problems) > before:
        return None
    hours = WorkingHours(**kw)
    if hours.start == hours.end:
        c.add(node, "CFG_VALUE", "working_hours.start and end are the same time")
        return None
    return hours


def _risk(c: _Checker, node: yaml.Node) -> RiskSettings | None:
    m = c.mapping(node, _RISK_KEYS, "risk")
    if m is None:
        return None
    before = len(c.problems)
    weights = dict(DEFAULT_WEIGHTS)
    if "weights" in m:
        w = m["weights"]
        if not isinstance(w, yaml.MappingNode):
            c.add(w, "CFG_TYPE", "risk.weights must be a mapping", "departing: 4")
        else:
            for key_node, value_node in w.value:
                name = c.scalar(key_node, str, "a factor in risk.weights")
                value = c.scalar(value_node, int, f"risk.weights.{name}")
                if not isinstance(name, str) or not isinstance(value, int):
                    continue
                if name not in DEFAULT_WEIGHTS and not name.startswith(
                    ("watchlist.", "location.", "sensitivity.")
                ):
                    c.add(
                        key_node,
                        "CFG_VALUE",
                        f"unknown risk factor '{name}'",
                        nearest(name, tuple(DEFAULT_WEIGHTS))
                        or "watchlist.<type>, location.<class>, sensitivity.<level>, off_hours",
                    )
                elif not -10 <= value <= 10:
                    c.add(value_node, "CFG_VALUE", f"risk.weights.{name} must be -10 to 10")
                else:
                    weights[name] = value
    bands = DEFAULT_BANDS
    if "bands" in m:
        b = m["bands"]
        parsed: list[tuple[int, int]] = []
        if not isinstance(b, yaml.SequenceNode):
            c.add(b, "CFG_TYPE", "risk.bands must be a list", "[{score: 5, raise: 1}]")
        else:
            for item in b.value:
                band = c.mapping(item, ("score", "raise"), "a risk band")
                if band is None or "score" not in band or "raise" not in band:
                    if band is not None:
                        c.add(item, "CFG_REQUIRED", "a risk band needs 'score' and 'raise'")
                    continue
                score = c.positive_int(band["score"], "risk band score", 1, 100)
                levels = c.positive_int(band["raise"], "risk band raise", 1, 4)
                if score is not None and levels is not None:
                    parsed.append((score, levels))
        bands = tuple(sorted(parsed))
    if len(c.problems) > before:
        return None
    return RiskSettings(MappingProxyType(weights), bands)


def _user_map(c: _Checker, node: yaml.Node) -> tuple[tuple[str, str], ...] | None:
    """watchlist.user_map: {e-mail: local user name}."""
    if not isinstance(node, yaml.MappingNode):
        c.add(node, "CFG_TYPE", "watchlist.user_map must be a mapping", "alice@corp.example: alice")
        return None
    out: list[tuple[str, str]] = []
    for key_node, value_node in node.value:
        email = c.scalar(key_node, str, "an e-mail in watchlist.user_map")
        user = c.scalar(value_node, str, "a user name in watchlist.user_map")
        if not isinstance(email, str) or not isinstance(user, str):
            continue
        if "@" not in email:
            c.add(key_node, "CFG_VALUE", f"'{email}' in watchlist.user_map is not an e-mail")
            continue
        out.append((email.lower(), user))
    return tuple(out)


SYSLOG_FACILITIES = tuple(
    ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron"]
    + ["authpriv", "ftp"]
    + [f"local{i}" for i in range(8)]
)


def _address(c: _Checker, node: yaml.Node, what: str) -> str | None:
    value = c.scalar(node, str, what)
    if not isinstance(value, str):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        c.add(node, "CFG_VALUE", f"{what} must be HOST:PORT, not {value!r}", "e.g. 127.0.0.1:514")
        return None
    return value


def _url(c: _Checker, node: yaml.Node, what: str) -> str | None:
    from urllib.parse import urlsplit

    value = c.scalar(node, str, what)
    if not isinstance(value, str):
        return None
    try:
        u = urlsplit(value)
        ok = u.scheme in ("http", "https") and bool(u.hostname)
        _ = u.port
    except ValueError:
        ok = False
    if not ok:
        c.add(node, "CFG_VALUE", f"{what} must be an http:// or https:// URL")
        return None
    if u.username or u.password:
        c.add(
            node,
            "CFG_SECRET_INLINE",
            f"{what} carries credentials; the config is readable by more people than a secret",
            "move them to token_file / password_file (or *_env)",
        )
        return None
    if u.scheme == "http" and u.hostname not in ("127.0.0.1", "localhost", "::1"):
        c.add(
            node,
            "CFG_TLS_OFF",
            f"{what} is plain http to another host: alerts and credentials travel readable",
            "use https://",
            severity=WARNING,
        )
    return value


def _secret_file(c: _Checker, node: yaml.Node, path: str, what: str) -> None:
    """A credential file must exist and be readable by its owner only (0600 or 0400)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        c.add(node, "CFG_SECRET_MISSING", f"{what}: cannot read {path}: {exc.strerror}")
        return
    if st.st_mode & 0o077:
        c.add(
            node,
            "CFG_UNSAFE_SECRET",
            f"{what}: {path} has mode {st.st_mode & 0o777:04o}; others could read the secret",
            f"chmod 0600 {shlex.quote(path)}",
        )


def _sink_file(c: _Checker, node: yaml.Node, path: str, what: str) -> None:
    """What the agent will check when it opens the file (safe directories, no symlink, its own
    regular file, mode within 0640), each problem at the sink's path: a config that passes
    opens at start and on reload."""
    from agent.sinks import check_sink_path  # agent.sinks imports this module

    for problem in check_sink_path(path):
        c.add(node, problem.code, f"{what}.path: {problem.message}", problem.hint)


def _build(c: _Checker, root: yaml.Node | None) -> Config | None:
    if root is None:
        c.add(None, "CFG_EMPTY", "the config file is empty", "start from config/agent.yaml")
        return None
    top = c.mapping(root, _TOP_KEYS, "the config")
    if top is None:
        return None
    values: dict[str, Any] = {}

    if "watch" not in top:
        c.add(root, "CFG_REQUIRED", "the config needs a 'watch' list", "watch: [{path: /srv/rnd}]")
    else:
        wnode = top["watch"]
        if not isinstance(wnode, yaml.SequenceNode):
            c.add(wnode, "CFG_TYPE", "'watch' must be a list of {path, tags, ...}")
        else:
            specs = [_watch_entry(c, n, i) for i, n in enumerate(wnode.value)]
            values["watch"] = tuple(s for s in specs if s is not None)
            seen: dict[str, yaml.Node] = {}
            for spec_node, spec in zip(wnode.value, specs, strict=True):
                if spec is None:
                    continue
                if spec.path in seen:
                    c.add(spec_node, "CFG_DUPLICATE_WATCH", f"{spec.path} is watched twice")
                seen[spec.path] = spec_node

    if "rules" in top:
        rules = c.string_list(top["rules"], "rules")
        if rules is not None:
            values["rules"] = tuple(resolve_path(r, c.base) for r in rules)

    if "sinks" in top:
        snode = top["sinks"]
        if not isinstance(snode, yaml.SequenceNode):
            c.add(snode, "CFG_TYPE", "'sinks' must be a list", "sinks: [{type: stdout}]")
        else:
            sinks = [_sink_entry(c, n, i) for i, n in enumerate(snode.value)]
            values["sinks"] = tuple(s for s in sinks if s is not None)
            for sink_node, sink in zip(snode.value, sinks, strict=True):
                if sink is not None and sink.path is not None:
                    _not_in_watched(c, sink_node, sink.path, values.get("watch", ()), "a sink")
            if not snode.value:
                c.add(snode, "CFG_VALUE", "'sinks' is empty: records would go nowhere")
            elif values["sinks"] and len(values["sinks"]) == len(snode.value):
                _health_reaches_a_sink(c, snode, values["sinks"])

    simple: dict[str, Callable[[yaml.Node], Any]] = {
        "state_dir": lambda n: c.path(n, "state_dir"),
        "queue_size": lambda n: c.positive_int(n, "queue_size", 1000),
        "egress_queue_size": lambda n: c.positive_int(n, "egress_queue_size", 100),
        "staging_queue_size": lambda n: c.positive_int(n, "staging_queue_size", 100),
        "rescan_max_entries": lambda n: c.positive_int(n, "rescan_max_entries", 100),
        "heartbeat_interval": lambda n: c.duration(n, "heartbeat_interval"),
        "root_check_interval": lambda n: c.duration(n, "root_check_interval"),
        "rules_check_interval": lambda n: c.duration(n, "rules_check_interval"),
        "marker_name": lambda n: _marker_name(c, n),
        "source": lambda n: _choice(c, n, "source", SOURCES),
    }
    for key, parse in simple.items():
        if key in top:
            value = parse(top[key])
            if value is not None:
                values[key] = value

    if "state_dir" in values:
        _not_in_watched(
            c, top["state_dir"], values["state_dir"], values.get("watch", ()), "state_dir"
        )

    if "inotify" in top:
        m = c.mapping(top["inotify"], _INOTIFY_KEYS, "inotify")
        if m is not None:
            kw: dict[str, Any] = {}
            for key in ("max_queued_events", "max_user_watches"):
                if key in m:
                    kw[key] = c.positive_int(m[key], f"inotify.{key}", 16384)
            if "apply_sysctl" in m:
                kw["apply_sysctl"] = c.scalar(m["apply_sysctl"], bool, "inotify.apply_sysctl")
            if all(v is not None for v in kw.values()):
                values["inotify"] = InotifySettings(**kw)

    if "locations" in top:
        m = c.mapping(top["locations"], _LOCATION_KEYS, "locations")
        if m is not None:
            kw = {}
            for key in ("enabled", "cloud_sync"):
                if key in m:
                    kw[key] = c.scalar(m[key], bool, f"locations.{key}")
            if "removable_patterns" in m:
                kw["removable_patterns"] = c.string_list(
                    m["removable_patterns"], "locations.removable_patterns"
                )
            for key in ("staging_dirs", "home_roots"):
                if key in m:
                    given = c.string_list(m[key], f"locations.{key}")
                    kw[key] = (
                        tuple(resolve_path(v, c.base) for v in given) if given is not None else None
                    )
            if "mount_check_interval" in m:
                kw["mount_check_interval"] = c.duration(
                    m["mount_check_interval"], "locations.mount_check_interval"
                )
            if "home_depth" in m:
                kw["home_depth"] = c.positive_int(
                    m["home_depth"], "locations.home_depth", 1, HOME_DEPTH_MAX
                )
            if "exclude" in m:
                kw["exclude"] = _excludes(c, m["exclude"], "locations.exclude")
            if all(v is not None for v in kw.values()):
                values["locations"] = LocationSettings(**kw)
    if "lineage" in top:
        m = c.mapping(top["lineage"], _LINEAGE_KEYS, "lineage")
        if m is not None:
            kw = {}
            if "enabled" in m:
                kw["enabled"] = c.scalar(m["enabled"], bool, "lineage.enabled")
            for key, low in (
                ("max_files", 100),
                ("hash_max_bytes", 4096),
                ("io_budget_bytes", 1 << 20),
            ):
                if key in m:
                    kw[key] = c.positive_int(m[key], f"lineage.{key}", low)
            if all(v is not None for v in kw.values()):
                settings = LineageSettings(**kw)
                if settings.hash_max_bytes > settings.io_budget_bytes:
                    c.add(
                        m.get("hash_max_bytes", top["lineage"]),
                        "CFG_VALUE",
                        "lineage.hash_max_bytes is larger than lineage.io_budget_bytes: such "
                        "files could never be hashed",
                    )
                values["lineage"] = settings

    if "enrichment" in top:
        m = c.mapping(top["enrichment"], _ENRICHMENT_KEYS, "enrichment")
        if m is not None:
            kw = {}
            for key in ("queue_size", "per_user_queue", "io_budget_bytes", "decode_max_bytes"):
                if key in m:
                    kw[key] = c.positive_int(m[key], f"enrichment.{key}")
            if "max_delay" in m:
                kw["max_delay"] = c.duration(m["max_delay"], "enrichment.max_delay")
            if "cpu_budget" in m:
                kw["cpu_budget"] = c.fraction(m["cpu_budget"], "enrichment.cpu_budget")
            if all(v is not None for v in kw.values()):
                values["enrichment"] = EnrichmentSettings(**kw)

    if "processes" in top:
        m = c.mapping(top["processes"], _PROCESS_KEYS, "processes")
        if m is not None:
            kw = {}
            for key in ("enabled", "attribution"):
                if key in m:
                    kw[key] = c.scalar(m[key], bool, f"processes.{key}")
            if "interval" in m:
                kw["interval"] = c.duration(m["interval"], "processes.interval")
            for key in ("fanotify", "fanotify_dirs"):
                if key not in m:
                    continue
                node = m[key]
                raw = node_value(node) if isinstance(node, yaml.ScalarNode) else None
                if isinstance(raw, bool):  # YAML 1.1 reads unquoted on/off as booleans
                    kw[key] = "on" if raw else "off"
                else:
                    kw[key] = _choice(c, node, f"processes.{key}", ("auto", "on", "off"))
            if "source" in m:
                kw["source"] = _choice(
                    c, m["source"], "processes.source", ("auto", "kernel", "poll")
                )
            if all(v is not None for v in kw.values()):
                values["processes"] = ProcessSettings(**kw)

    if "outbox" in top:
        m = c.mapping(top["outbox"], _OUTBOX_KEYS, "outbox")
        if m is not None:
            kw = {}
            if "enabled" in m:
                kw["enabled"] = c.scalar(m["enabled"], bool, "outbox.enabled")
            if "max_records" in m:
                kw["max_records"] = c.positive_int(m["max_records"], "outbox.max_records", 1000)
            if "max_bytes" in m:
                kw["max_bytes"] = c.positive_int(m["max_bytes"], "outbox.max_bytes", 1 << 20)
            if "sync" in m:
                kw["sync"] = _choice(c, m["sync"], "outbox.sync", OUTBOX_SYNC)
            if all(v is not None for v in kw.values()):
                values["outbox"] = OutboxSettings(**kw)

    if "watchlist" in top:
        m = c.mapping(top["watchlist"], _WATCHLIST_KEYS, "watchlist")
        if m is not None:
            kw = {}
            for key in ("days_before", "days_after"):
                if key in m:
                    kw[key] = c.positive_int(m[key], f"watchlist.{key}", 0, 3650)
            if "local_part" in m:
                kw["local_part"] = c.scalar(m["local_part"], bool, "watchlist.local_part")
            if "check_interval" in m:
                kw["check_interval"] = c.duration(m["check_interval"], "watchlist.check_interval")
            if "user_map" in m:
                kw["user_map"] = _user_map(c, m["user_map"])
            if all(v is not None for v in kw.values()):
                values["watchlist"] = WatchlistSettings(**kw)

    if "privacy" in top:
        m = c.mapping(top["privacy"], _PRIVACY_KEYS, "privacy")
        if m is not None and "pseudonymize" in m:
            flag = c.scalar(m["pseudonymize"], bool, "privacy.pseudonymize")
            if flag is not None:
                values["pseudonymize"] = flag

    if "rule_errors" in top:
        mode = c.scalar(top["rule_errors"], str, "rule_errors")
        if mode in ("quarantine", "fatal"):
            values["rule_errors"] = mode
        elif isinstance(mode, str):
            c.add(
                top["rule_errors"],
                "CFG_VALUE",
                f"rule_errors must be quarantine or fatal, not '{mode}'",
                nearest(mode, ("quarantine", "fatal")) or "quarantine (the default) or fatal",
            )

    if "trusted" in top:
        trusted = _trusted(c, top["trusted"])
        if trusted is not None:
            values["trusted"] = trusted

    if "working_hours" in top:
        hours = _working_hours(c, top["working_hours"])
        if hours is not None:
            values["working_hours"] = hours

    if "risk" in top:
        risk = _risk(c, top["risk"])
        if risk is not None:
            values["risk"] = risk

    if "metrics" in top:
        m = c.mapping(top["metrics"], _METRICS_KEYS, "metrics")
        if m is not None:
            if "textfile" in m:
                textfile = c.path(m["textfile"], "metrics.textfile")
                if textfile is not None and not textfile.endswith(".prom"):
                    c.add(
                        m["textfile"],
                        "CFG_VALUE",
                        "metrics.textfile must end in .prom: node_exporter reads no other file",
                        "e.g. /var/lib/node_exporter/textfile_collector/exfilwatch.prom",
                    )
                    textfile = None
                values["metrics_textfile"] = textfile
            if "listen" in m:
                listen = _address(c, m["listen"], "metrics.listen")
                host = listen.rpartition(":")[0].strip("[]") if listen else None
                if listen is not None and host not in ("127.0.0.1", "localhost", "::1"):
                    c.add(
                        m["listen"],
                        "CFG_VALUE",
                        "metrics.listen must be a loopback address: the metrics name what is "
                        "watched",
                        "e.g. 127.0.0.1:9101; let node_exporter or a local proxy expose it",
                    )
                    listen = None
                values["metrics_listen"] = listen

    if errors_only(c.problems):
        return None
    return Config(source_file=c.file, **values)


def _not_in_watched(
    c: _Checker, node: yaml.Node, path: str, watch: tuple[WatchSpec, ...], what: str
) -> None:
    # The agent never writes into a watched tree: its own writes would be events, in a loop.
    for spec in watch:
        if path == spec.path or path.startswith(spec.path.rstrip("/") + "/"):
            c.add(
                node,
                "CFG_WRITES_INTO_WATCHED_TREE",
                f"{what} ({path}) is inside the watched tree {spec.path}",
                "put agent output under /var/log/exfilwatch or /var/lib/exfilwatch",
            )


def _excludes(c: _Checker, node: yaml.Node, what: str) -> tuple[str, ...] | None:
    """Exclude globs as agent/sources/paths.py reads them, each problem at its own entry."""
    from agent.sources.paths import compile_excludes

    patterns = c.string_list(node, what)
    if patterns and isinstance(node, yaml.SequenceNode):
        for item in node.value:
            value = node_value(item) if isinstance(item, yaml.ScalarNode) else None
            if isinstance(value, str) and value:
                for problem_text in compile_excludes([value]).problems:
                    c.add(item, "CFG_GLOB", f"{what}: {problem_text}")
    return patterns


def _choice(c: _Checker, node: yaml.Node, what: str, choices: tuple[str, ...]) -> str | None:
    value = c.scalar(node, str, what)
    if isinstance(value, str) and value not in choices:
        c.add(
            node,
            "CFG_VALUE",
            f"unknown {what} '{value}'",
            nearest(value, choices) or f"one of {', '.join(choices)}",
        )
        return None
    return value if isinstance(value, str) else None


def _marker_name(c: _Checker, node: yaml.Node) -> str | None:
    value = c.scalar(node, str, "marker_name")
    if isinstance(value, str) and (not value or "/" in value or value in (".", "..")):
        c.add(node, "CFG_VALUE", "marker_name must be a plain file name", "e.g. .exfilwatch.yaml")
        return None
    return value if isinstance(value, str) else None


def check_text(text: str, file: str) -> tuple[Config | None, list[Problem]]:
    """Validate config text; returns the config (None on any error) and every problem."""
    node, problems = compose_yaml(text, file, "CFG")
    if problems:
        return None, problems
    c = _Checker(file)
    config = _build(c, node)
    return config, sorted(c.problems, key=lambda p: (p.line, p.col))


def check_file(path: str) -> tuple[Config | None, list[Problem]]:
    """Validate a config file: permissions, size, YAML, schema. Collects every problem."""
    problems = check_permissions(path, "CFG")
    if any(p.code == "CFG_UNREADABLE" for p in problems):
        return None, problems
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, [Problem(path, 0, 0, "CFG_UNREADABLE", exc.strerror or str(exc))]
    if len(data) > MAX_CONFIG_BYTES:
        return None, [Problem(path, 0, 0, "CFG_TOO_LARGE", "config is larger than 1 MiB")]
    text, bad = decode_utf8(data, path, "CFG")
    if text is None:
        return None, bad
    config, more = check_text(text, path)
    problems += more
    if errors_only(problems):
        return None, problems
    return config, problems


def load(path: str) -> Config:
    """The config at `path`, or ProblemsError listing every error."""
    config, problems = check_file(path)
    if config is None:
        raise ProblemsError(errors_only(problems) or problems)
    return config


__all__ = [
    "SENSITIVITY_LEVELS",
    "WARNING",
    "Config",
    "EnrichmentSettings",
    "InotifySettings",
    "SinkSpec",
    "WatchSpec",
    "check_file",
    "check_text",
    "default_config_path",
    "load",
]
