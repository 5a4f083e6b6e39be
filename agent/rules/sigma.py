"""Sigma log sources: which events a rule with a `logsource` sees, and the mapping of the Sigma
taxonomy's field names to the agent's ECS fields (docs/sigma.md).

A rule without `logsource` is a native exfilwatch rule: it sees every event and names ECS
fields. A rule with one is a Sigma rule: it sees only the events of its category, and its
taxonomy names (`Image`, `CommandLine`, `TargetFilename`, ...) are mapped at load time (the
ECS names work too). A log source the agent has no events for (auditd, syslog services, network
connections, another operating system) makes the rule *inactive*: loaded, reported with the
reason, never run and never matching other events.

The mapping is a table, not pySigma's processing pipelines: the agent evaluates rules itself
(it converts nothing to a query language), so a pipeline would add a dependency to rename a
dozen fields; the table is what pySigma's field-mapping transformation would hold."""

from __future__ import annotations

from dataclasses import dataclass

PROCESS_ACTIONS = frozenset({"process_started"})
FILE_CREATED = frozenset({"created", "closed_write", "moved", "moved_in", "rescanned"})

# Sysmon for Linux's process creation fields (Sigma taxonomy, linux/process_creation).
_PROCESS_FIELDS = {
    "Image": "process.executable",
    "CommandLine": "process.command_line",
    "CurrentDirectory": "process.working_directory",
    "User": "user.name",
    "ProcessId": "process.pid",
    "ParentImage": "process.parent.executable",
    "ParentCommandLine": "process.parent.command_line",
    "ParentProcessId": "process.parent.pid",
    "LogonId": "exfilwatch.attribution.login_uid",
}
# The process that did a file operation, on file events (attribution fills these).
_ACTOR_FIELDS = {
    "Image": "process.executable",
    "CommandLine": "process.command_line",
    "User": "user.name",
    "ProcessId": "process.pid",
}


@dataclass(frozen=True)
class LogSource:
    """What a supported Sigma log source means here."""

    actions: frozenset[str]  # event.action values of its events
    fields: dict[str, str]  # Sigma taxonomy name -> ECS field


SUPPORTED: dict[str, LogSource] = {
    "process_creation": LogSource(PROCESS_ACTIONS, _PROCESS_FIELDS),
    "file_event": LogSource(FILE_CREATED, {**_ACTOR_FIELDS, "TargetFilename": "file.path"}),
    "file_change": LogSource(
        frozenset({"closed_write", "modified"}), {**_ACTOR_FIELDS, "TargetFilename": "file.path"}
    ),
    "file_access": LogSource(
        frozenset({"opened", "closed_nowrite"}), {**_ACTOR_FIELDS, "TargetFilename": "file.path"}
    ),
    "file_delete": LogSource(
        frozenset({"deleted", "moved_out"}), {**_ACTOR_FIELDS, "TargetFilename": "file.path"}
    ),
    "file_rename": LogSource(
        frozenset({"moved"}),
        {**_ACTOR_FIELDS, "TargetFilename": "file.path", "SourceFilename": "exfilwatch.src_path"},
    ),
}
PRODUCTS = frozenset({"linux", "unix"})  # events of this host; no product: any


def resolve(logsource: dict[str, str]) -> tuple[LogSource | None, str | None]:
    """(the log source, None) when the agent has its events, else (None, why not)."""
    product = logsource.get("product")
    category = logsource.get("category")
    service = logsource.get("service")
    shown = ", ".join(f"{k}: {v}" for k, v in logsource.items() if k != "definition")
    if product is not None and product.lower() not in PRODUCTS:
        return None, f"logsource {{{shown}}}: the agent has no {product} events"
    if service is not None:
        return None, f"logsource {{{shown}}}: the agent reads no {service} logs"
    if category is None:
        # product: linux alone means the system's log lines (syslog, journal): not read here.
        return None, f"logsource {{{shown}}}: the agent reads no system log lines"
    found = SUPPORTED.get(category.lower())
    if found is None:
        return None, f"logsource {{{shown}}}: the agent has no {category} events"
    return found, None


def map_field(source: LogSource, key: str) -> str:
    """A selection key (`Image|endswith`) with its taxonomy field mapped (`process.executable
    |endswith`); ECS names and unknown names are returned as they are."""
    field, bar, modifiers = key.partition("|")
    mapped = source.fields.get(field)
    return f"{mapped}{bar}{modifiers}" if mapped is not None else key
