"""The rule engine: pure (no I/O, no threads, no wall clock: an event's time is `now`)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.alerts import build_alert
from agent.events import FIELDS, Event, format_timestamp
from agent.rules.compiler import CompiledRule, RuleSet
from agent.rules.prefilter import Candidates

CapHit = Callable[[str, int, dict[str, Any]], None]


@dataclass(frozen=True)
class Caps:
    """Bounds on engine memory; hitting one is reported through `on_cap`, never silent."""

    max_groups: int = 100_000  # per correlation rule
    max_events: int = 10_000  # kept per group of a counting correlation
    max_suppress_keys: int = 100_000  # per rule
    max_total_events: int = 1_000_000  # matches held in all counting windows (~120 MB)
    sample_paths: int = 10


class _Window:
    """Matches of one group inside a counting correlation's time span."""

    __slots__ = ("items", "total", "values")

    def __init__(self) -> None:
        self.items: deque[tuple[int, str, int, Any]] = deque()
        self.values: dict[Any, int] = {}
        self.total = 0.0

    def evict_before(self, cutoff: int) -> None:
        items = self.items
        while items and items[0][0] < cutoff:
            self._drop()

    def _drop(self) -> None:
        _, _, _, value = self.items.popleft()
        if value is not None:
            n = self.values[value] - 1
            if n:
                self.values[value] = n
            else:
                del self.values[value]
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.total -= value


class _Sequence:
    __slots__ = ("first", "samples", "step")

    def __init__(self, first: int) -> None:
        self.first = first
        self.step = 0
        self.samples: list[tuple[int, str]] = []


class _Plan:
    """A correlation as `_feed` uses it, worked out once (not per match)."""

    __slots__ = (
        "by_rule",
        "corr",
        "exceptions",
        "first",
        "getters",
        "gte",
        "id",
        "key_of",
        "kind",
        "scope",
        "span",
        "steps",
        "strict",
        "value_of",
    )

    def __init__(self, corr: CompiledRule) -> None:
        c = corr.rule.correlation
        assert c is not None
        self.corr = corr
        self.id = corr.id
        self.getters = tuple(FIELDS[f] for f in c.group_by if f in FIELDS)
        self.key_of = _key_of(self.getters)
        self.scope = corr.scope
        self.exceptions = corr.exceptions
        # Sigma aliases: a group-by name is a different field of each correlated rule.
        self.by_rule: dict[str, tuple[Callable[[Event], Any], ...]] | None = None
        if c.aliases:
            aliases = {name: dict(per_rule) for name, per_rule in c.aliases}
            self.by_rule = {
                base: tuple(
                    FIELDS[aliases[f][base]] if f in aliases else FIELDS[f] for f in c.group_by
                )
                for base in c.rules
            }
        self.span = int(c.timespan * 1_000_000)
        self.first = c.rules[0]
        self.steps = c.rules
        self.kind = c.type
        # temporal: the distinct rules seen in the window are what counts (the base id).
        self.value_of = FIELDS[c.field] if c.field and c.type != "temporal" else None
        self.gte = c.gte
        self.strict = c.strict


def _key_of(getters: tuple[Callable[[Event], Any], ...]) -> Callable[[Event], tuple[Any, ...]]:
    """The group key of an event: its values of the group-by fields."""
    if len(getters) == 2:
        first, second = getters
        return lambda e: (first(e), second(e))
    return lambda e: tuple([g(e) for g in getters])


_PLACE_CACHE = 1024
_MAX_CHAIN = 16  # correlations over correlations followed at most this deep
TRUSTED_KEYS = 1000  # rule/user/place combinations counted between two summaries
STATE_VERSION = 1


class Engine:
    """Evaluates events against a compiled rule set; returns alert records."""

    def __init__(self, ruleset: RuleSet, caps: Caps | None = None, on_cap: CapHit | None = None):
        self.ruleset = ruleset
        self.caps = caps or Caps()
        self._on_cap = on_cap
        specific: dict[str, list[CompiledRule]] = {}
        anywhere: list[CompiledRule] = []
        for r in ruleset.rules.values():
            if r.actions is None:
                anywhere.append(r)
            else:
                for action in r.actions:
                    specific.setdefault(action, []).append(r)
        self._any = tuple(anywhere)
        self._by_action = {a: tuple(rs) + self._any for a, rs in specific.items()}
        # (action, location class) -> the rules that can match it: most events are tried on
        # only a few (a write in a tagged tree never on the removable-media rules). Bounded:
        # a replayed file may hold any location text; past the cap it is filtered per event.
        # Within a place, rules with gates are tried only when a gate passes (prefilter.py).
        self._by_place: dict[tuple[str, str | None], Candidates] = {}
        self._sets: dict[tuple[str, ...], Any] = {}  # RE2 sets of the places, by patterns
        # OrderedDicts: evicting the oldest entry at a cap is O(1) (a plain dict's first key
        # gets slower to find as deleted slots pile up at its front).
        self._windows: dict[str, OrderedDict[tuple[Any, ...], Any]] = {
            cid: OrderedDict() for cid in ruleset.correlations
        }
        self._suppress: dict[str, OrderedDict[tuple[Any, ...], list[int]]] = {}
        # rule id -> the getters of its suppress.by fields (looked up at its first match)
        self._suppress_by: dict[str, tuple[Callable[[Event], Any], ...]] = {}
        # base rule id -> the correlations it feeds (compiled rules, not ids: one lookup less
        # per match)
        plans = {cid: _Plan(corr) for cid, corr in ruleset.correlations.items()}
        self._consumers: dict[str, tuple[_Plan, ...]] = {
            rid: tuple(plans[c] for c in cids) for rid, cids in ruleset.consumers.items()
        }
        self._items = 0  # matches held in all counting windows, against caps.max_total_events
        self.matched = 0
        self.alerts = 0
        # (rule id, user, location class, provider) -> [matches, bytes] at trusted destinations
        # since the last `take_trusted`: what would have alerted or fed a correlation there.
        self._trusted: dict[tuple[str, str | None, str | None, str | None], list[int]] = {}
        self.trusted_matched = 0

    # evaluation ------------------------------------------------------------------------

    def _candidates(self, e: Event) -> tuple[CompiledRule, ...]:
        action, location = e.action, e.location
        place = location.lower() if location is not None else None
        peers = self._by_action.get(action, self._any)
        rules = tuple(
            r for r in peers if r.locations is None or (place is not None and place in r.locations)
        )
        if len(self._by_place) >= _PLACE_CACHE:
            return rules  # past the cap: filtered per event, every rule of the place tried
        candidates = self._by_place[(action, location)] = Candidates(rules, self._sets, peers)
        return candidates.for_event(e) if candidates.gated else candidates.rules

    def candidates(self, e: Event) -> tuple[CompiledRule, ...]:
        """The rules tried on `e` (by action, location class and gates), in load order: a
        superset of those that match it."""
        candidates = self._by_place.get((e.action, e.location))
        if candidates is None:
            return self._candidates(e)
        return candidates.for_event(e) if candidates.gated else candidates.rules

    def process(self, e: Event) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        place = self._by_place.get((e.action, e.location))  # candidates(), inline
        if place is None:
            rules = self._candidates(e)
        else:
            rules = place.for_event(e) if place.gated else place.rules
        for r in rules:
            # Scope first: it is one comparison, and most users are on no watchlist.
            if r.scope and e.watchlist not in r.scope:
                continue
            if not r.match(e):
                continue
            if r.exceptions and self._excepted(r, e):
                continue
            if e.location_trusted and not r.rule.match_trusted:
                self._count_trusted(r.id, e)
                continue
            self.matched += 1
            if r.generate:
                suppressed = self._admit(r, e)
                if suppressed is not None:
                    out.append(build_alert(r.rule, e, suppressed=suppressed))
            consumers = self._consumers.get(r.id)
            if consumers is not None:
                for plan in consumers:
                    alert = self._feed(plan, r.id, e)
                    if alert is not None:
                        self._fired(plan, alert, e, out, 0)
        self.alerts += len(out)
        return out

    def _fire(
        self, plan: _Plan, base_id: str, e: Event, out: list[dict[str, Any]], depth: int
    ) -> None:
        """Feed a correlation; when it fires, see `_fired`."""
        alert = self._feed(plan, base_id, e)
        if alert is not None:
            self._fired(plan, alert, e, out, depth)

    def _fired(
        self, plan: _Plan, alert: dict[str, Any], e: Event, out: list[dict[str, Any]], depth: int
    ) -> None:
        """A correlation fired: its alert (if it generates one) and the correlations over it
        (a Sigma chain: the loader refuses loops; the depth is a guard)."""
        if plan.corr.generate:
            out.append(alert)
        if depth < _MAX_CHAIN:
            for above in self._consumers.get(plan.id, ()):
                self._fire(above, plan.id, e, out, depth + 1)

    def _count_trusted(self, rule_id: str, e: Event) -> None:
        self.trusted_matched += 1
        key = (rule_id, e.user_name, e.location, e.location_provider)
        slot = self._trusted.get(key)
        if slot is None:
            if len(self._trusted) >= TRUSTED_KEYS:
                key = (rule_id, None, None, "(more destinations and users)")
                slot = self._trusted.setdefault(key, [0, 0])
            else:
                slot = self._trusted[key] = [0, 0]
        slot[0] += 1
        slot[1] += e.size or 0

    def take_trusted(self) -> list[dict[str, Any]]:
        """Matches at trusted destinations since the last call, per rule, user and place (so a
        trusted destination cannot hide volume); empties the count."""
        counts, self._trusted = self._trusted, {}
        return [
            {
                k: v
                for k, v in (
                    ("rule", rid),
                    ("user", user),
                    ("location", location),
                    ("provider", provider),
                    ("matches", n),
                    ("bytes", size),
                )
                if v is not None
            }
            for (rid, user, location, provider), (n, size) in sorted(
                counts.items(), key=lambda kv: (-kv[1][0], str(kv[0]))
            )
        ]

    @staticmethod
    def _excepted(r: CompiledRule, e: Event) -> bool:
        for match, expires, _ in r.exceptions:
            if (expires is None or e.timestamp_us < expires) and match(e):
                return True
        return False

    def _admit(self, r: CompiledRule, e: Event) -> int | None:
        """Whether `r`'s alert on `e` goes out: None when its suppression holds it back
        (counted), else how many were held back before it (0 without suppression)."""
        sup = r.rule.suppress
        if sup is None:
            return 0
        by = self._suppress_by.get(r.id)
        if by is None:
            by = self._suppress_by[r.id] = tuple(FIELDS[f] for f in sup.by)
        keys = self._suppress.get(r.id)
        if keys is None:
            keys = self._suppress[r.id] = OrderedDict()
        key = tuple([get(e) for get in by])
        now = e.timestamp_us
        state = keys.get(key)
        if state is not None and now < state[0]:
            state[1] += 1
            return None
        suppressed = state[1] if state is not None else 0
        if state is None and len(keys) >= self.caps.max_suppress_keys:
            keys.popitem(last=False)
            self._cap("suppress_keys", self.caps.max_suppress_keys, rule=r.id)
        keys[key] = [now + int(sup.seconds * 1_000_000), 0]
        return suppressed

    def _feed(self, plan: _Plan, base_id: str, e: Event) -> dict[str, Any] | None:
        corr = plan.corr
        if plan.scope and e.watchlist not in plan.scope:
            return None
        if plan.exceptions and self._excepted(corr, e):
            return None
        groups = self._windows[plan.id]
        if plan.by_rule is None:
            key: tuple[Any, ...] = plan.key_of(e)
        else:
            key = tuple([g(e) for g in plan.by_rule[base_id]])
        now = e.timestamp_us
        span = plan.span
        kind = plan.kind
        state = groups.get(key)
        if state is None:
            if kind == "temporal_ordered" and base_id != plan.first:
                return None  # a later step with no first step: nothing to remember
            if len(groups) >= self.caps.max_groups:
                self._forget(groups.popitem(last=False)[1])  # the oldest group goes first
                self._cap("correlation_groups", self.caps.max_groups, rule=corr.id)
            state = _Sequence(now) if kind == "temporal_ordered" else _Window()
            groups[key] = state
        if isinstance(state, _Sequence):
            return self._step(plan, base_id, e, key, state)
        win = state
        items = win.items
        before = len(items)
        cutoff = now - span
        if items and items[0][0] < cutoff:
            win.evict_before(cutoff)
        if len(items) >= self.caps.max_events:
            win._drop()
            self._cap("correlation_events", self.caps.max_events, rule=corr.id)
        self._items += len(items) - before + 1
        while self._items > self.caps.max_total_events and len(groups) > 1:
            # A bound in memory, not only in counts: the oldest group of this rule goes.
            oldest_key = next(iter(groups))
            if oldest_key == key:
                groups.move_to_end(key)
                continue
            self._forget(groups.pop(oldest_key))
            self._cap("correlation_memory", self.caps.max_total_events, rule=corr.id)
        # temporal: the distinct rules seen in the window are what counts.
        value_of = plan.value_of
        value = base_id if kind == "temporal" else (value_of(e) if value_of else None)
        if isinstance(value, tuple):
            value = value or None
        items.append((now, e.path, e.size or 0, value))
        if value is not None:
            win.values[value] = win.values.get(value, 0) + 1
            if kind == "value_sum" and isinstance(value, int | float):
                win.total += value
        if kind == "event_count":
            metric: float = len(items)
        elif kind == "value_sum":
            metric = win.total
        else:  # value_count, temporal
            metric = len(win.values)
        gte = plan.gte
        assert gte is not None
        if metric < gte or (plan.strict and metric <= gte):
            return None
        details = self._details(corr, key, [(t, p, s) for t, p, s, _ in win.items], metric)
        self._forget(groups.pop(key))
        first = win.items[0][0] if win.items else now
        return self._correlation_alert(corr, e, details, (e.hostname, key, first, now))

    def _correlation_alert(
        self, corr: CompiledRule, e: Event, details: dict[str, Any], identity: tuple[Any, ...]
    ) -> dict[str, Any] | None:
        """The alert of a correlation that fired, unless its suppression holds it back."""
        suppressed = self._admit(corr, e)
        if suppressed is None:
            return None
        return build_alert(
            corr.rule, e, correlation=details, suppressed=suppressed, identity=identity
        )

    def _forget(self, state: Any) -> None:
        if isinstance(state, _Window):
            self._items -= len(state.items)

    def _step(
        self, plan: _Plan, base_id: str, e: Event, key: tuple[Any, ...], seq: _Sequence
    ) -> dict[str, Any] | None:
        steps = plan.steps
        now = e.timestamp_us
        if seq.step and now - seq.first > plan.span:
            seq.first, seq.step, seq.samples = now, 0, []
        if seq.step == 1 and base_id == steps[0]:
            # The first step again before the second: the sequence starts over from the newer
            # one, or a read at 0 and 29 min then a copy at 31 min would be missed.
            seq.first, seq.step, seq.samples = now, 0, []
        if steps[seq.step] != base_id:
            return None
        if seq.step == 0:
            seq.first = now
        seq.step += 1
        if len(seq.samples) < self.caps.sample_paths:
            seq.samples.append((now, e.path))
        if seq.step < len(steps):
            return None
        corr = plan.corr
        groups = self._windows[corr.id]
        del groups[key]
        items = [(t, p, 0) for t, p in seq.samples]
        details = self._details(corr, key, items, float(len(steps)))
        details["steps"] = list(steps)
        return self._correlation_alert(corr, e, details, (e.hostname, key, seq.first, now))

    def _details(
        self,
        corr: CompiledRule,
        key: tuple[Any, ...],
        items: list[tuple[int, str, int]],
        metric: float,
    ) -> dict[str, Any]:
        c = corr.rule.correlation
        assert c is not None
        paths: dict[str, None] = {}
        for _, p, _ in items:
            paths.setdefault(p)
        sample = list(paths)[: self.caps.sample_paths]
        group = {
            f: (list(v) if isinstance(v, tuple) else v)
            for f, v in zip(c.group_by, key, strict=True)
        }
        return {
            "type": c.type,
            "value": metric,
            "threshold": c.gte,
            "timespan_s": c.timespan,
            "count": len(items),
            "distinct_files": len(paths),
            "bytes": sum(s for _, _, s in items),
            "first": format_timestamp(items[0][0]) if items else None,
            "last": format_timestamp(items[-1][0]) if items else None,
            "sample_paths": sample,
            "group": group,
        }

    # upkeep ----------------------------------------------------------------------------

    def expire(self, now_us: int) -> int:
        """Drop groups with nothing left inside their time span (a scheduled job calls this)."""
        dropped = 0
        for cid, groups in self._windows.items():
            c = self.ruleset.correlations[cid].rule.correlation
            assert c is not None
            cutoff = now_us - int(c.timespan * 1_000_000)
            for key in [k for k, s in groups.items() if _last(s) < cutoff]:
                self._forget(groups.pop(key))
                dropped += 1
        for keys in self._suppress.values():
            for key in [k for k, (until, count) in keys.items() if until < now_us and not count]:
                del keys[key]
        return dropped

    def adopt(self, old: Engine) -> int:
        """Carry correlation and suppression state over from `old` for unchanged rules."""
        kept = 0
        self._trusted, old._trusted = old._trusted, {}
        self.trusted_matched += old.trusted_matched
        old_all = {**old.ruleset.rules, **old.ruleset.correlations}
        for cid in self._windows:
            prev = old.ruleset.correlations.get(cid)
            if prev is not None and prev.fingerprint == self.ruleset.correlations[cid].fingerprint:
                self._windows[cid] = old._windows.get(cid, OrderedDict())
                self._items += sum(
                    len(w.items) for w in self._windows[cid].values() if isinstance(w, _Window)
                )
                kept += 1
        mine = {**self.ruleset.rules, **self.ruleset.correlations}
        for rid, keys in old._suppress.items():
            if rid in mine and rid in old_all and mine[rid].fingerprint == old_all[rid].fingerprint:
                self._suppress[rid] = keys
        return kept

    def export_state(self) -> dict[str, Any]:
        """Correlation windows and suppression as plain data (JSON-ready; file names may hold
        lone surrogates, which json.dumps escapes), keyed by rule id with the rule's
        fingerprint, so a restart resumes only rules that did not change. Call on the thread
        that feeds the engine."""
        windows: dict[str, Any] = {}
        for cid, groups in self._windows.items():
            rows: list[Any] = []
            for key, st in groups.items():
                if isinstance(st, _Sequence):
                    rows.append(
                        [list(key), "seq", st.first, st.step, [list(x) for x in st.samples]]
                    )
                else:
                    rows.append([list(key), "win", [list(x) for x in st.items]])
            if rows:
                windows[cid] = {
                    "fingerprint": self.ruleset.correlations[cid].fingerprint,
                    "groups": rows,
                }
        every = {**self.ruleset.rules, **self.ruleset.correlations}
        suppress: dict[str, Any] = {}
        for rid, keys in self._suppress.items():
            if keys and rid in every:
                suppress[rid] = {
                    "fingerprint": every[rid].fingerprint,
                    "keys": [[list(k), until, count] for k, (until, count) in keys.items()],
                }
        return {"version": STATE_VERSION, "windows": windows, "suppress": suppress}

    def import_state(self, data: Any, now_us: int) -> dict[str, int]:
        """Resume from `export_state` output: rules whose fingerprint still matches get their
        groups back (expired matches dropped, caps applied); anything malformed is skipped.
        Returns what was restored and what was not."""
        out = {"groups": 0, "matches": 0, "suppressed_keys": 0, "skipped_rules": 0, "bad": 0}
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            out["bad"] += 1
            return out
        windows = data.get("windows")
        windows = windows if isinstance(windows, dict) else {}
        for cid, saved in windows.items():
            corr = self.ruleset.correlations.get(cid)
            if (
                corr is None
                or not isinstance(saved, dict)
                or saved.get("fingerprint") != corr.fingerprint
            ):
                out["skipped_rules"] += 1
                continue
            c = corr.rule.correlation
            assert c is not None
            span = int(c.timespan * 1_000_000)
            groups = self._windows[cid]
            for row in saved.get("groups", []):
                try:
                    restored = self._restore_group(c, row, now_us - span)
                except (TypeError, ValueError, IndexError):
                    out["bad"] += 1
                    continue
                if restored is None:
                    continue
                key, st = restored
                if len(groups) >= self.caps.max_groups:
                    break
                n = len(st.items) if isinstance(st, _Window) else 0
                if self._items + n > self.caps.max_total_events:
                    break
                groups[key] = st
                self._items += n
                out["groups"] += 1
                out["matches"] += n if n else 1
        every = {**self.ruleset.rules, **self.ruleset.correlations}
        suppress = data.get("suppress")
        suppress = suppress if isinstance(suppress, dict) else {}
        for rid, saved in suppress.items():
            rule = every.get(rid)
            if (
                rule is None
                or not isinstance(saved, dict)
                or saved.get("fingerprint") != rule.fingerprint
            ):
                out["skipped_rules"] += 1
                continue
            keys = self._suppress.setdefault(rid, OrderedDict())
            for row in saved.get("keys", []):
                good = isinstance(row, list) and len(row) == 3
                key_list, until, count = row if good else (None, None, None)
                if not (isinstance(key_list, list) and isinstance(until, int)) or not isinstance(
                    count, int
                ):
                    out["bad"] += 1
                    continue
                if until < now_us and not count:
                    continue
                if len(keys) >= self.caps.max_suppress_keys:
                    break
                keys[_tuplify(key_list)] = [until, count]
                out["suppressed_keys"] += 1
        return out

    def _restore_group(
        self, c: Any, row: Any, cutoff: int
    ) -> tuple[tuple[Any, ...], _Window | _Sequence] | None:
        key = _tuplify(row[0])
        if not isinstance(key, tuple):
            raise TypeError("key")
        if row[1] == "seq":
            first, step, samples = int(row[2]), int(row[3]), row[4]
            if first < cutoff or not 0 < step < len(c.rules):
                return None
            seq = _Sequence(first)
            seq.step = step
            seq.samples = [(int(t), str(p)) for t, p in samples][: self.caps.sample_paths]
            return key, seq
        win = _Window()
        for t, p, size, value in row[2][-self.caps.max_events :]:
            if int(t) < cutoff:
                continue
            v = _tuplify(value)
            win.items.append((int(t), str(p), int(size), v))
            if v is not None:
                win.values[v] = win.values.get(v, 0) + 1
                if isinstance(v, int | float) and not isinstance(v, bool):
                    win.total += v
        return (key, win) if win.items else None

    def stats(self) -> dict[str, Any]:
        return {
            "rules": len(self.ruleset.rules),
            "correlations": len(self.ruleset.correlations),
            "groups": sum(len(g) for g in self._windows.values()),
            "matched": self.matched,
            "alerts": self.alerts,
        }

    def _cap(self, name: str, cap: int, **data: Any) -> None:
        if self._on_cap is not None:
            self._on_cap(name, cap, data)


def _tuplify(value: Any) -> Any:
    """JSON gave lists where the engine keeps tuples (hashable group keys and values)."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _last(state: Any) -> int:
    if isinstance(state, _Sequence):
        return state.first
    return int(state.items[-1][0]) if state.items else 0
