"""Sink, outbox and metrics settings: read as written, and every mistake located with a code."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import OutboxSettings, SinkSpec, check_text


def problems_of(text: str, tmp: Path) -> list[str]:
    _, problems = check_text(text, str(tmp / "agent.yaml"))
    return [f"{p.line}:{p.col} {p.code} {p.message}" for p in problems]


def test_syslog_http_and_stdout_settings_are_read_as_written(tmp_path: Path) -> None:
    token = tmp_path / "hec.token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    text = f"""\
watch: []
sinks:
  - type: syslog
    address: 127.0.0.1:6514
    protocol: tls
    facility: auth
    min_severity: high
    records: [alert]
  - type: http
    url: https://splunk.example.com:8088/services/collector/event
    format: hec
    token_file: {token}
    index: security
    timeout: 3s
  - type: stdout
    format: pretty
outbox: {{max_records: 5000, sync: normal}}
metrics: {{textfile: {tmp_path}/x.prom, listen: "127.0.0.1:9101"}}
"""
    config, problems = check_text(text, str(tmp_path / "agent.yaml"))
    assert config is not None, problems
    syslog, http, stdout = config.sinks
    assert syslog == SinkSpec(
        "syslog",
        records=frozenset({"alert"}),
        min_severity=73,
        address="127.0.0.1:6514",
        protocol="tls",
        facility="auth",
    )
    assert (http.url, http.format, http.token_file, http.index, http.timeout) == (
        "https://splunk.example.com:8088/services/collector/event",
        "hec",
        str(token),
        "security",
        3.0,
    )
    assert http.label == "http:https://splunk.example.com:8088/services/collector/event"
    assert stdout.format == "pretty"
    assert config.outbox == OutboxSettings(max_records=5000, sync="normal")
    assert config.metrics_listen == "127.0.0.1:9101"


def test_every_sink_mistake_is_located_with_a_code(tmp_path: Path) -> None:
    loose = tmp_path / "loose.token"
    loose.write_text("s3cret\n")
    loose.chmod(0o644)
    text = f"""\
watch: []
sinks:
  - type: syslog
    protocol: udp
  - type: syslog
    address: nowhere
    protocol: sctp
  - type: http
    url: https://user:pw@es.example.com/_bulk
  - type: http
    url: https://splunk.example.com/services/collector/event
    format: hec
  - type: http
    url: https://es.example.com/_bulk
    format: bulk
    token_file: {loose}
  - type: file
    path: {tmp_path}/log/a.jsonl
    url: https://x.example.com/
  - type: stdout
    min_severity: urgent
metrics: {{listen: "0.0.0.0:9101", textfile: {tmp_path}/metrics.txt}}
"""
    got = problems_of(text, tmp_path)
    expect = [
        "3:5 CFG_REQUIRED sinks[0] (syslog) needs an 'address'",
        "6:14 CFG_VALUE sinks[1].address must be HOST:PORT, not 'nowhere'",
        "7:15 CFG_VALUE unknown sinks[1].protocol 'sctp'",
        "9:10 CFG_SECRET_INLINE sinks[2].url carries credentials",
        "10:5 CFG_REQUIRED sinks[3]: Splunk HEC needs a token",
        "16:17 CFG_UNSAFE_SECRET sinks[4].token_file",
        "19:10 CFG_VALUE sinks[5]: a file sink takes no 'url'",
        "21:19 CFG_VALUE unknown sinks[6].min_severity 'urgent'",
        "22:19 CFG_VALUE metrics.listen must be a loopback address",
        "22:45 CFG_VALUE metrics.textfile must end in .prom",
    ]
    for want in expect:
        assert any(g.startswith(want) for g in got), f"{want!r} not in {got}"
    assert not any("s3cret" in g or ":pw@" in g for g in got), "never a secret in a message"


def test_a_token_from_the_environment_missing_is_a_warning_and_plain_http_elsewhere_too(
    tmp_path: Path,
) -> None:
    name = "EXFILWATCH_TEST_TOKEN_UNSET"
    os.environ.pop(name, None)
    text = f"""\
watch: []
sinks:
  - type: http
    url: http://soar.example.com/hook
    token_env: {name}
  - type: syslog
    address: 127.0.0.1:514
    protocol: tls
    verify: false
"""
    config, problems = check_text(text, str(tmp_path / "agent.yaml"))
    assert config is not None, "warnings only"
    codes = sorted(p.code for p in problems)
    assert codes == ["CFG_SECRET_MISSING", "CFG_TLS_OFF", "CFG_TLS_UNVERIFIED"]
