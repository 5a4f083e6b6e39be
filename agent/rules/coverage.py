"""ATT&CK coverage of a rule set: which techniques its enabled rules detect, as a table.

`exfilwatch rules coverage` prints it; docs/rules.md holds the table for the shipped packs,
and a test keeps the two equal (so the table is generated, never hand-edited)."""

from __future__ import annotations

from collections.abc import Iterable

from agent.rules.compiler import RuleSet
from agent.rules.model import Rule

# Names of the techniques the shipped packs use (ATT&CK Enterprise); an id not listed here
# prints without a name.
TECHNIQUE_NAMES = {
    "T1005": "Data from Local System",
    "T1020": "Automated Exfiltration",
    "T1027": "Obfuscated Files or Information",
    "T1029": "Scheduled Transfer",
    "T1030": "Data Transfer Size Limits",
    "T1036": "Masquerading",
    "T1036.003": "Rename Legitimate Utilities",
    "T1036.004": "Masquerade Task or Service",
    "T1036.005": "Match Legitimate Resource Name or Location",
    "T1036.006": "Space after Filename",
    "T1036.008": "Masquerade File Type",
    "T1048": "Exfiltration Over Alternative Protocol",
    "T1048.003": "Exfiltration Over Unencrypted Non-C2 Protocol",
    "T1052.001": "Exfiltration over USB",
    "T1070.003": "Clear Command History",
    "T1070.004": "File Deletion",
    "T1074.001": "Local Data Staging",
    "T1132.001": "Standard Encoding",
    "T1213.003": "Code Repositories",
    "T1485": "Data Destruction",
    "T1486": "Data Encrypted for Impact",
    "T1560": "Archive Collected Data",
    "T1560.001": "Archive via Utility",
    "T1565.001": "Stored Data Manipulation",
    "T1567": "Exfiltration Over Web Service",
    "T1567.002": "Exfiltration to Cloud Storage",
}


def _key(technique: str) -> tuple[int, int]:
    base, _, sub = technique[1:].partition(".")
    return int(base), int(sub or 0)


def coverage(rules: Iterable[Rule]) -> dict[str, list[Rule]]:
    """Technique id -> the enabled rules tagged with it, by technique id."""
    found: dict[str, list[Rule]] = {}
    for rule in rules:
        if not rule.enabled or rule.status == "deprecated":
            continue
        for technique in rule.techniques:
            found.setdefault(technique, []).append(rule)
    return {t: sorted(found[t], key=lambda r: r.id) for t in sorted(found, key=_key)}


def markdown(ruleset: RuleSet) -> str:
    """The coverage table: technique, its name, and the rules tagged with it (level)."""
    compiled = [*ruleset.rules.values(), *ruleset.correlations.values()]
    table = coverage(c.rule for c in compiled)
    lines = ["| technique | name | rules (level) |", "|---|---|---|"]
    for technique, rules in table.items():
        listed = ", ".join(f"`{r.id}` ({r.level})" for r in rules)
        lines.append(f"| {technique} | {TECHNIQUE_NAMES.get(technique, '')} | {listed} |")
    return "\n".join(lines) + "\n"
