"""Rule model: what a rule file says, after validation, before compilation."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

LEVELS = ("informational", "low", "medium", "high", "critical")
# ECS event.severity / risk score per level (the scale Elastic's detection rules use).
SEVERITY = {"informational": 1, "low": 21, "medium": 47, "high": 73, "critical": 99}
STATUSES = ("stable", "test", "experimental", "deprecated", "unsupported")
CORRELATION_TYPES = ("event_count", "value_count", "value_sum", "temporal", "temporal_ordered")
# Sigma correlation types the engine does not evaluate: such a rule loads inactive.
UNSUPPORTED_CORRELATION_TYPES = ("value_avg", "value_percentile", "value_median")
ATTACK_TACTICS = (
    "reconnaissance",
    "resource_development",
    "initial_access",
    "execution",
    "persistence",
    "privilege_escalation",
    "defense_evasion",
    "credential_access",
    "discovery",
    "lateral_movement",
    "collection",
    "command_and_control",
    "exfiltration",
    "impact",
    # ATT&CK v18 split defense evasion into these two (SigmaHQ writes them).
    "stealth",
    "defense_impairment",
)


def tactic_of(tag: str) -> str | None:
    """The tactic an `attack.` tag names, spelled with underscores (the spec's hyphenated
    `attack.privilege-escalation` and `attack.privilege_escalation` alike); None otherwise."""
    if not tag.startswith("attack."):
        return None
    name = tag[7:].replace("-", "_")
    return name if name in ATTACK_TACTICS else None


@dataclass(frozen=True)
class Where:
    """Where a definition came from, for errors and for the SIEM (`rule.ruleset`)."""

    file: str
    line: int
    col: int = 1


@dataclass(frozen=True)
class RuleException:
    """A structured allow-list entry: a selection that, when it matches, silences the rule."""

    match: Any  # the selection's YAML node
    reason: str
    owner: str
    expires_us: int | None
    where: Where


@dataclass(frozen=True)
class Suppress:
    by: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class Correlation:
    type: str
    rules: tuple[str, ...]
    group_by: tuple[str, ...]
    timespan: float
    gte: float | None = None  # threshold (`condition: {gte: N}`); None for temporal_ordered
    field: str | None = None  # value_count / value_sum
    strict: bool = False  # `gt: N`: the metric must exceed gte
    # Why the engine cannot evaluate it (a Sigma type or condition it lacks); None if it can.
    unsupported: str | None = None
    # Sigma's `generate: true` inside a correlation: its rules alert by themselves too.
    generate: bool = False
    # Sigma's field name aliases: a group-by name -> ((correlated rule, its field), ...).
    aliases: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


@dataclass(frozen=True)
class RuleTest:
    name: str
    events: tuple[tuple[float, dict[str, Any]], ...]  # (seconds from start, flat fields)
    expect_alerts: int
    expect_fields: dict[str, Any]
    where: Where


@dataclass(frozen=True)
class Rule:
    """One rule as written (plus local overrides applied). `detection` is None for a
    correlation rule, `correlation` None for a single-event rule."""

    id: str
    title: str
    description: str
    level: str
    where: Where
    tags: tuple[str, ...] = ()
    status: str = "stable"
    enabled: bool = True
    author: str = ""
    references: tuple[str, ...] = ()
    detection: dict[str, Any] | None = None  # selection name -> YAML node (marks for errors)
    condition: str | None = None
    condition_node: Any = field(default=None, compare=False, repr=False)
    correlation: Correlation | None = None
    generate: bool | None = None  # None: default (base rules of a correlation do not alert)
    # Also match events at trusted destinations (exfilwatch.location.trusted); by default
    # such matches are only counted (the trusted_activity health record).
    match_trusted: bool = False
    # Sigma's logsource (product, category, service, definition, ...); () for native rules.
    logsource: tuple[tuple[str, str], ...] = ()
    # A Sigma document (logsource, taxonomy, name, or no level): its references and group-by
    # fields that the agent cannot resolve make it inactive rather than an error.
    sigma: bool = False
    name: str | None = None  # Sigma's `name`, by which correlations may refer to the rule
    inactive: str | None = None  # why a Sigma rule cannot run (set by the loader)
    scope: tuple[str, ...] = ()  # watchlist statuses the rule is limited to
    exceptions: tuple[RuleException, ...] = ()
    suppress: Suppress | None = None
    tests: tuple[RuleTest, ...] = ()
    overridden_by: tuple[str, ...] = ()

    @property
    def techniques(self) -> tuple[str, ...]:
        return _techniques_at(self.tags, None)

    def techniques_for(self, location: str | None) -> tuple[str, ...]:
        """The techniques an alert on an event at `location` (its location class) detected:
        of a rule naming several ways out (T1052.001 removable media, T1567.002 a sync
        folder), the one the event took; all of them when it took none of those."""
        return _techniques_at(self.tags, location)

    @property
    def tactics(self) -> tuple[str, ...]:
        return tuple(t for t in map(tactic_of, self.tags) if t is not None)


# Techniques that are a way out through one kind of place (the event's location class).
DESTINATION_TECHNIQUES = {
    "T1052": "removable",
    "T1052.001": "removable",
    "T1567.002": "cloud_sync",
    "T1048.003": "network_share",
}


@lru_cache(maxsize=4096)  # by (tags, location): a few hundred rules, a few location classes
def _techniques_at(tags: tuple[str, ...], location: str | None) -> tuple[str, ...]:
    techniques = tuple(
        t.split(".", 1)[1].upper() for t in tags if t.startswith("attack.t") and t[8:9].isdigit()
    )
    places = {DESTINATION_TECHNIQUES.get(t) for t in techniques}
    if location is None or location not in places:
        return techniques
    return tuple(t for t in techniques if DESTINATION_TECHNIQUES.get(t, location) == location)


@dataclass(frozen=True)
class Override:
    """Local tuning of shipped rules, applied after every file is read."""

    target: str  # a rule id, or "tag:<tag>"
    where: Where
    enabled: bool | None = None
    level: str | None = None
    exceptions: tuple[RuleException, ...] = ()
    timespan: float | None = None
    gte: float | None = None
    suppress: Suppress | None = None


@dataclass
class Definitions:
    """Everything read from a set of rule files, before overrides and compilation."""

    rules: dict[str, Rule] = field(default_factory=dict)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    macros: dict[str, tuple[Any, Where]] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # Rules whose metadata had errors: their detection is still compiled, so one pass
    # reports every problem, but they never run.
    check_only: list[Rule] = field(default_factory=list)
    # Sigma filter documents: a rule-shaped detection that, when it matches, silences the
    # listed rules (by id or name). Kept as rules (detection, logsource, where) + targets.
    filters: list[tuple[Rule, tuple[str, ...]]] = field(default_factory=list)
