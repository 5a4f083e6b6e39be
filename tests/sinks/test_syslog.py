"""The syslog sink gives each record one RFC 5424 message that a real rsyslogd parses back."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.events import dumps
from agent.sinks.errors import DeliveryError
from agent.sinks.syslog import SD_ID, SyslogSink

RSYSLOGD = shutil.which("rsyslogd") or next(
    (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None
)
needs_rsyslog = pytest.mark.skipif(
    RSYSLOGD is None, reason="rsyslogd is not installed (apt-get install rsyslog)"
)
MODULE_DIRS = ("/usr/lib/*/rsyslog", "/usr/lib/rsyslog", "/usr/lib64/rsyslog")


def has_module(name: str) -> bool:
    return any(glob.glob(f"{d}/{name}.so") for d in MODULE_DIRS)


HAS_RELP = has_module("imrelp")
HAS_GTLS = has_module("lmnsd_gtls") and shutil.which("openssl") is not None
SKIP_RELP = "rsyslog's imrelp is not installed (apt-get install rsyslog-relp)"
SKIP_TLS = "rsyslog's gtls driver or openssl is missing (apt-get install rsyslog-gnutls openssl)"

DEADLINE = 30.0  # seconds; generous for a loaded 2-core CI machine, never slept through
TIMESTAMP = "2026-01-02T03:04:05.123456Z"
# An RFC 5424 message as this sink writes it: header fields, then "-" or one SD-ELEMENT.
RFC5424 = re.compile(
    rb"<(\d{1,3})>1 (\S+) ([!-~]{1,255}) ([!-~]{1,48}) ([!-~]{1,128}) ([!-~]{1,32}) "
    rb'(-|\[[!-~]{1,32}(?: [!-~]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*\]) (.*)',
    re.DOTALL,
)


def alert(n: int, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "@timestamp": TIMESTAMP,
        "event": {"kind": "alert", "id": f"{n:032x}", "severity": 73, "action": "copied"},
        "rule": {"id": "usb-copy", "name": "Copy to USB"},
        "user": {"name": "alice"},
        "file": {"path": f"/rnd/plans/{n}.pdf"},
        "host": {"hostname": "ws-17"},
    }
    record.update(extra)
    return record


# A private rsyslogd -------------------------------------------------------------------------


def free_port(kind: socket.SocketKind) -> int:
    return free_ports(kind)[0]


def free_ports(*kinds: socket.SocketKind) -> list[int]:
    """Loopback ports nothing uses now, one per kind, all different (each stays bound until
    every one is picked)."""
    held = []
    try:
        for kind in kinds:
            sock = socket.socket(socket.AF_INET, kind)
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def listening(port: int, proto: str) -> bool:
    """Whether something on this host listens on 127.0.0.1:port (/proc/net: no probe
    connection that the daemon would log)."""
    state = "0A" if proto == "tcp" else "07"  # TCP_LISTEN; an unconnected bound UDP socket
    needle = f"0100007F:{port:04X}"
    for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == needle and fields[3] == state:
            return True
    return False


def wait_until(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.005
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


@dataclass(frozen=True)
class Certs:
    ca: str
    other_ca: str
    cert: str
    key: str


def make_certs(where: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other-ca"):
        openssl(
            "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=exfilwatch test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
    )  # fmt: skip
    return Certs(
        ca=str(where / "ca.pem"),
        other_ca=str(where / "other-ca.pem"),
        cert=str(where / "server.pem"),
        key=str(where / "server.key"),
    )


# Each received message as one JSON line: rsyslog's own parse of the header, the raw and the
# parsed (mmpstrucdata) structured data, and MSG. maxMessageSize stays rsyslog's default
# (8096 bytes) on purpose: the sink's default max_message must fit an unconfigured rsyslog.
CONFIG = """\
global(workDirectory="{work}"{tls_global})
module(load="imudp")
module(load="imtcp")
module(load="mmpstrucdata")
{relp_module}
template(name="received" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="structured_data" name="structured-data" format="jsonf")
  property(outname="sd" name="$!rfc5424-sd" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
ruleset(name="remote") {{
  action(type="mmpstrucdata")
  action(type="omfile" file="{out}" template="received")
}}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="remote")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="remote")
{inputs}
# rsyslogd's own messages (start, stop, errors) stay out of what the tests read.
*.* action(type="omfile" file="{internal}")
"""


class Rsyslog:
    """A private rsyslogd (not the system's, not a service) on free loopback ports, writing
    every message it receives to `out` as parsed JSON. stop() and start() keep the ports, so
    a test can take the collector away and bring it back."""

    def __init__(self, where: Path, certs: Certs | None = None) -> None:
        self.dir = where
        self.out = where / "received.jsonl"
        self.internal = where / "rsyslogd-internal.log"
        self.pidfile = where / "rsyslogd.pid"
        self.conf = where / "rsyslog.conf"
        self.log = where / "rsyslogd.stderr"
        self.udp, self.tcp, relp, tls = free_ports(
            socket.SOCK_DGRAM, socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_STREAM
        )
        self.relp = relp if HAS_RELP else 0
        self.tls = tls if certs else 0
        self.certs = certs
        work = where / "work"
        work.mkdir()
        inputs = []
        if self.relp:
            inputs.append(
                f'input(type="imrelp" address="127.0.0.1" port="{self.relp}" ruleset="remote")'
            )
        if certs:
            inputs.append(
                f'input(type="imtcp" address="127.0.0.1" port="{self.tls}" ruleset="remote" '
                'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")'
            )
        self.conf.write_text(
            CONFIG.format(
                work=work,
                out=self.out,
                internal=self.internal,
                udp=self.udp,
                tcp=self.tcp,
                relp_module='module(load="imrelp")' if self.relp else "",
                inputs="\n".join(inputs),
                tls_global=(
                    f' defaultNetstreamDriverCAFile="{certs.ca}"'
                    f' defaultNetstreamDriverCertFile="{certs.cert}"'
                    f' defaultNetstreamDriverKeyFile="{certs.key}"'
                    if certs
                    else ""
                ),
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def check_config(self) -> None:
        assert RSYSLOGD is not None
        done = subprocess.run(
            [RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        assert RSYSLOGD is not None and self.proc is None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-i", str(self.pidfile), "-f", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        ports = [(self.udp, "udp"), (self.tcp, "tcp"), (self.relp, "tcp"), (self.tls, "tcp")]

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited: {self.log.read_text()}")
            return all(listening(port, proto) for port, proto in ports if port)

        wait_until("rsyslogd to listen", ready)

    def stop(self) -> None:
        """SIGTERM (rsyslogd finishes its queue and exits), SIGKILL if it does not."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        self.proc = None

    def received(self) -> list[dict[str, Any]]:
        """Every complete line written so far (a line being written is left for later)."""
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        """At least `count` messages, or an assertion naming how many came."""
        got: list[dict[str, Any]] = []

        def enough() -> bool:
            got[:] = self.received()
            return len(got) >= count

        try:
            wait_until(f"{count} messages", enough)
        except AssertionError:
            raise AssertionError(f"received {len(got)} of {count} messages") from None
        return got

    def port(self, protocol: str) -> int:
        return {"udp": self.udp, "tcp": self.tcp, "relp": self.relp, "tls": self.tls}[protocol]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs | None:
    if not HAS_GTLS:
        return None
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def rsyslog(tmp_path: Path, certs: Certs | None) -> Iterator[Rsyslog]:
    if RSYSLOGD is None:
        pytest.skip("rsyslogd is not installed (apt-get install rsyslog)")
    daemon = Rsyslog(tmp_path, certs)
    daemon.check_config()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def sinks() -> Iterator[Callable[..., SyslogSink]]:
    """Makes sinks and closes every one at the end of the test."""
    made: list[SyslogSink] = []

    def make(*args: Any, **kwargs: Any) -> SyslogSink:
        sink = SyslogSink(*args, **kwargs)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def sink_for(
    make: Callable[..., SyslogSink], daemon: Rsyslog, protocol: str, **kwargs: Any
) -> SyslogSink:
    if protocol == "relp" and not daemon.relp:
        pytest.skip(SKIP_RELP)
    if protocol == "tls":
        if daemon.certs is None:
            pytest.skip(SKIP_TLS)
        kwargs.setdefault("ca_file", daemon.certs.ca)
    return make(f"127.0.0.1:{daemon.port(protocol)}", protocol, **kwargs)


def sd_params(message: dict[str, Any]) -> dict[str, str]:
    """The SD params as rsyslog's mmpstrucdata decoded them."""
    parsed = json.loads(message["sd"]) if message["sd"] else {}
    params: dict[str, str] = parsed.get(SD_ID, {})
    return params


PROTOCOLS = ["udp", "tcp", "tls", "relp"]


# Delivery through rsyslogd ------------------------------------------------------------------


@needs_rsyslog
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rsyslog_parses_header_structured_data_and_msg(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink], protocol: str
) -> None:
    """An alert and a health record arrive with the PRI, MSGID, hostname, SD params and the
    JSON line that rsyslog itself parsed out of each message."""
    sink = sink_for(sinks, rsyslog, protocol)
    heartbeat = {
        "@timestamp": TIMESTAMP,
        "event": {"kind": "metric", "action": "heartbeat"},
        "log": {"level": "info"},
        "host": {"hostname": "ws-17"},
        "exfilwatch": {"health": {"uptime_s": 4.5}},
    }
    lines = [dumps(alert(1)), dumps(heartbeat)]
    sink.write(lines)
    got = rsyslog.wait_for(2)
    assert len(got) == 2
    first, second = got
    assert first["pri"] == str(16 * 8 + 3)  # local0, high -> err
    assert second["pri"] == str(16 * 8 + 6)  # local0, info
    assert [m["msgid"] for m in got] == ["alert", "metric"]
    assert {m["hostname"] for m in got} == {"ws-17"}
    assert {m["app_name"] for m in got} == {"exfilwatch"}
    assert {m["procid"] for m in got} == {str(os.getpid())}
    assert {m["timestamp"] for m in got} == {TIMESTAMP}
    assert sd_params(first) == {
        "id": f"{1:032x}",
        "action": "copied",
        "rule": "usb-copy",
        "severity": "high",
        "user": "alice",
        "path": "/rnd/plans/1.pdf",
    }
    assert sd_params(second) == {"action": "heartbeat"}
    assert [json.loads(m["msg"]) for m in got] == [json.loads(line) for line in lines]
    assert [m["msg"] for m in got] == lines
    assert sink.sent == 2


@needs_rsyslog
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hostile_file_names_give_one_message_per_record(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink], protocol: str
) -> None:
    """Newlines, `]`, quotes, backslashes, ANSI escapes and undecodable bytes in a file name
    neither split a message nor break the SD-ELEMENT: the path comes back in JSON form."""
    names = [
        "/rnd/a\nb.pdf",
        '/rnd/x] [exfilwatch@32473 id="forged"].pdf',
        '/rnd/q"uote\\back\\.pdf',
        "/rnd/\x1b[2J\x1b[31mred.pdf",
        "/rnd/bad-\udcff\udcfe.pdf",
        "/rnd/\r\n<13>1 - forged - - - - line",
        "/rnd/" + "]" * 2000,
    ]
    records = [alert(n, file={"path": name}) for n, name in enumerate(names)]
    sink = sink_for(sinks, rsyslog, protocol)
    sink.write([dumps(r) for r in records])
    got = rsyslog.wait_for(len(records))
    assert len(got) == len(records)
    assert [sd_params(m)["id"] for m in got] == [r["event"]["id"] for r in records]
    for message, name in zip(got, names, strict=True):
        assert json.loads(message["msg"])["file"]["path"] == name
        assert "\n" not in message["structured_data"]
        path = sd_params(message)["path"]  # the path as written in the JSON, at most 1024 chars
        assert len(path) <= 1024
        assert name.startswith(json.loads(f'"{path}"'))
        assert len(path) == 1024 or json.loads(f'"{path}"') == name


@needs_rsyslog
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_an_oversized_record_is_replaced_by_a_stub_naming_it(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink], protocol: str
) -> None:
    """A record longer than rsyslog's default 8096-byte message arrives as a small valid JSON
    object with its id, kind, action and rule, flagged truncated; over TCP the record after it
    is framed as usual."""
    big = alert(1, exfilwatch={"pad": "x" * 20_000})
    line = dumps(big)
    sink = sink_for(sinks, rsyslog, protocol)
    sink.write([line, dumps(alert(2))])
    got = rsyslog.wait_for(2)
    assert len(got) == 2
    stub = json.loads(got[0]["msg"])
    assert stub == {
        "@timestamp": TIMESTAMP,
        "event": {"id": big["event"]["id"], "kind": "alert", "action": "copied"},
        "rule": {"id": "usb-copy"},
        "host": {"hostname": "ws-17"},
        "exfilwatch": {"truncated": True, "size": len(line)},
    }
    assert sd_params(got[0])["id"] == big["event"]["id"]
    assert json.loads(got[1]["msg"]) == alert(2)
    assert sink.truncated == 1


@needs_rsyslog
@pytest.mark.parametrize("protocol", ["tcp", "tls", "relp"])
def test_a_write_while_the_collector_is_down_fails_and_the_next_reconnects(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink], protocol: str
) -> None:
    """With rsyslogd stopped a write raises connection_refused (the router keeps the batch);
    once it is back the next write opens a new connection and delivers."""
    sink = sink_for(sinks, rsyslog, protocol)
    sink.write([dumps(alert(1))])
    rsyslog.wait_for(1)
    rsyslog.stop()
    with pytest.raises(DeliveryError) as failed:
        sink.write([dumps(alert(2))])
    assert failed.value.reason == "connection_refused"
    rsyslog.start()
    sink.write([dumps(alert(2)), dumps(alert(3))])
    got = rsyslog.wait_for(3)
    assert [json.loads(m["msg"])["event"]["id"] for m in got] == [
        alert(n)["event"]["id"] for n in (1, 2, 3)
    ]
    assert sink.reconnects == 1
    assert sink.sent == 3


@needs_rsyslog
@pytest.mark.parametrize("protocol", ["tcp", "tls", "relp"])
def test_a_connection_the_collector_closed_is_replaced_before_writing(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink], protocol: str
) -> None:
    """rsyslogd restarted between two writes: the sink notices the old connection is closed
    and writes on a new one, so the record is not sent into a dead connection and lost."""
    sink = sink_for(sinks, rsyslog, protocol)
    sink.write([dumps(alert(1))])
    rsyslog.wait_for(1)
    rsyslog.stop()
    rsyslog.start()
    sink.write([dumps(alert(2))])
    got = rsyslog.wait_for(2)
    assert [sd_params(m)["id"] for m in got] == [alert(n)["event"]["id"] for n in (1, 2)]
    assert sink.reconnects == 1


@needs_rsyslog
def test_udp_reports_a_refused_port_on_a_later_write(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink]
) -> None:
    """UDP has no acknowledgement, but the connected socket hears the ICMP refusal: writes to
    a stopped collector start failing with connection_refused."""
    sink = sink_for(sinks, rsyslog, "udp")
    rsyslog.stop()
    deadline = time.monotonic() + DEADLINE
    with pytest.raises(DeliveryError) as failed:
        while time.monotonic() < deadline:
            sink.write([dumps(alert(1))])
    assert failed.value.reason == "connection_refused"


@needs_rsyslog
def test_tls_with_the_wrong_ca_fails_verification(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink]
) -> None:
    """Verification is on by default: a collector whose certificate another CA signed is
    refused with tls_error, and nothing is delivered. verify=False accepts it (unsafe)."""
    if rsyslog.certs is None:
        pytest.skip(SKIP_TLS)
    wrong = sink_for(sinks, rsyslog, "tls", ca_file=rsyslog.certs.other_ca)
    with pytest.raises(DeliveryError) as failed:
        wrong.write([dumps(alert(1))])
    assert failed.value.reason == "tls_error"
    assert "certificate" in str(failed.value)
    unchecked = sink_for(sinks, rsyslog, "tls", ca_file=rsyslog.certs.other_ca, verify=False)
    unchecked.write([dumps(alert(2))])
    got = rsyslog.wait_for(1)
    assert [sd_params(m)["id"] for m in got] == [alert(2)["event"]["id"]]


@needs_rsyslog
def test_tls_checks_the_server_name(rsyslog: Rsyslog, sinks: Callable[..., SyslogSink]) -> None:
    """The certificate must name the collector: 127.0.0.1 and localhost pass, another fails."""
    if rsyslog.certs is None:
        pytest.skip(SKIP_TLS)
    ok = sink_for(sinks, rsyslog, "tls", server_name="localhost")
    ok.write([dumps(alert(1))])
    wrong = sink_for(sinks, rsyslog, "tls", server_name="collector.example")
    with pytest.raises(DeliveryError) as failed:
        wrong.write([dumps(alert(2))])
    assert failed.value.reason == "tls_error"
    assert len(rsyslog.wait_for(1)) == 1


@needs_rsyslog
def test_relp_loses_nothing_when_the_collector_restarts_mid_stream(
    rsyslog: Rsyslog, sinks: Callable[..., SyslogSink]
) -> None:
    """rsyslogd gets SIGTERM while batches stream in and comes back: every batch a write
    returned for was received (RELP acknowledges each record), and retrying the failed ones
    as the router does leaves no gap."""
    sink = sink_for(sinks, rsyslog, "relp")
    bounced = threading.Event()
    errors: list[BaseException] = []

    def bounce() -> None:
        try:
            wait_until("the first records", lambda: len(rsyslog.received()) >= 200)
            rsyslog.stop()
            rsyslog.start()
        except BaseException as exc:  # handed to the test's thread, which asserts
            errors.append(exc)
        finally:
            bounced.set()

    thread = threading.Thread(target=bounce, name="rsyslog-bounce")
    thread.start()
    acknowledged: set[int] = set()
    failures = after = n = 0
    deadline = time.monotonic() + DEADLINE
    try:
        while after < 20 and time.monotonic() < deadline:
            batch = range(n, n + 10)
            try:
                sink.write([dumps(alert(i)) for i in batch])
            except DeliveryError:
                failures += 1
                bounced.wait(0.01)  # the router's backoff, shortened
                continue
            acknowledged.update(batch)
            n += 10
            after += bounced.is_set()
    finally:
        thread.join()
    assert not errors, errors
    assert after == 20, "the writes did not resume after the restart"
    assert failures >= 1, "no write saw the collector down"
    got = rsyslog.wait_for(len(acknowledged))
    received = {int(sd_params(m)["id"], 16) for m in got}
    assert acknowledged - received == set()
    assert received == set(range(n))


# Against a bare TCP listener: what rsyslogd cannot be made to do on cue ------------------------


def read_frames(conn: socket.socket, count: int) -> list[bytes]:
    """`count` octet-counted (RFC 6587) messages from `conn`."""
    conn.settimeout(DEADLINE)
    data = b""
    frames: list[bytes] = []
    while len(frames) < count:
        match = re.match(rb"(\d+) ", data)
        if match and len(data) >= match.end() + int(match[1]):
            end = match.end() + int(match[1])
            frames.append(data[match.end() : end])
            data = data[end:]
            continue
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {len(frames)} of {count} messages"
        data += chunk
    return frames


def ids(frames: list[bytes]) -> list[str]:
    out = []
    for frame in frames:
        match = RFC5424.fullmatch(frame)
        assert match is not None, frame
        out.append(json.loads(match[8])["event"]["id"])
    return out


def test_after_a_reset_the_last_batches_are_sent_again() -> None:
    """A collector that closes with bytes it never read resets the connection; those bytes
    are lost although TCP acknowledged them, so the next connection starts with them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sink = SyslogSink(f"127.0.0.1:{listener.getsockname()[1]}", "tcp", timeout=DEADLINE)
        try:
            sink.write([dumps(alert(1)), dumps(alert(2))])  # acknowledged, never read
            first, _ = listener.accept()
            first.close()  # unread data: the kernel answers with RST
            sink.write([dumps(alert(3))])
            second, _ = listener.accept()
            with second:
                assert ids(read_frames(second, 3)) == [alert(n)["event"]["id"] for n in (1, 2, 3)]
        finally:
            sink.close()
    assert (sink.sent, sink.resent, sink.reconnects) == (3, 2, 1)


def test_after_a_clean_close_nothing_is_sent_twice() -> None:
    """A collector that read everything and closed (FIN) lost nothing: the next connection
    carries only the new batch."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sink = SyslogSink(f"127.0.0.1:{listener.getsockname()[1]}", "tcp", timeout=DEADLINE)
        try:
            sink.write([dumps(alert(1))])
            first, _ = listener.accept()
            with first:
                assert ids(read_frames(first, 1)) == [alert(1)["event"]["id"]]
            sink.write([dumps(alert(2))])
            second, _ = listener.accept()
            with second:
                assert ids(read_frames(second, 1)) == [alert(2)["event"]["id"]]
        finally:
            sink.close()
    assert (sink.sent, sink.resent, sink.reconnects) == (2, 0, 1)


# Without a collector --------------------------------------------------------------------------


def test_the_constructor_does_not_connect() -> None:
    """The agent starts while the collector is down: nothing listens on the port, yet the sink
    is made; the first write says why it failed."""
    port = free_port(socket.SOCK_STREAM)
    sink = SyslogSink(f"127.0.0.1:{port}", "tcp", timeout=2.0)
    assert sink.name == f"syslog:127.0.0.1:{port}/tcp"
    with pytest.raises(DeliveryError) as failed:
        sink.write([dumps(alert(1))])
    assert failed.value.reason == "connection_refused"
    assert sink.sent == 0
    sink.close()


def test_an_unknown_host_is_a_dns_error() -> None:
    """A name that does not resolve fails the write with dns_error (RFC 6761: .invalid never
    resolves)."""
    sink = SyslogSink("collector.invalid:514", "tcp", timeout=2.0)
    with pytest.raises(DeliveryError) as failed:
        sink.write([dumps(alert(1))])
    assert failed.value.reason == "dns_error"


@pytest.mark.parametrize(
    ("args", "kwargs", "complaint"),
    [
        (("localhost",), {}, "HOST:PORT"),
        (("localhost:0",), {}, "HOST:PORT"),
        (("::1:514",), {}, "HOST:PORT"),
        (("localhost:514", "sctp"), {}, "protocol"),
        (("localhost:514",), {"facility": "local9"}, "facility"),
        (("localhost:514",), {"app_name": "exfil watch"}, "app_name"),
        (("localhost:514",), {"app_name": "x" * 49}, "app_name"),
        (("localhost:514",), {"max_message": 100}, "max_message"),
        (("localhost:514",), {"max_message": 70_000}, "max_message"),
        (("localhost:514",), {"timeout": 0}, "timeout"),
        (("localhost:514", "tls"), {"key_file": "/k"}, "cert_file"),
    ],
)
def test_bad_settings_fail_at_construction(
    args: tuple[str, ...], kwargs: dict[str, Any], complaint: str
) -> None:
    """A setting the sink could never use is refused when the config is loaded."""
    with pytest.raises(ValueError, match=complaint):
        SyslogSink(*args, **kwargs)


def test_ipv6_addresses_take_brackets() -> None:
    sink = SyslogSink("[::1]:6514", "tls", verify=False)
    assert (sink.host, sink.port, sink.name) == ("::1", 6514, "syslog:[::1]:6514/tls")


@pytest.mark.parametrize(
    ("record", "pri"),
    [
        ({"event": {"kind": "alert", "severity": 99}}, 16 * 8 + 2),
        ({"event": {"kind": "alert", "severity": 73}}, 16 * 8 + 3),
        ({"event": {"kind": "alert", "severity": 47}}, 16 * 8 + 4),
        ({"event": {"kind": "alert", "severity": 21}}, 16 * 8 + 5),
        ({"event": {"kind": "alert", "severity": 1}}, 16 * 8 + 6),
        ({"event": {"kind": "alert", "severity": "high"}}, 16 * 8 + 4),
        ({"event": {"kind": "state"}, "log": {"level": "error"}}, 16 * 8 + 3),
        ({"event": {"kind": "state"}, "log": {"level": "warning"}}, 16 * 8 + 4),
        ({"event": {"kind": "metric"}, "log": {"level": "info"}}, 16 * 8 + 6),
        ({"event": {"kind": "alert"}, "log": {"level": "error"}}, 16 * 8 + 3),
        ({"log": "error"}, 16 * 8 + 6),
        ({}, 16 * 8 + 6),
    ],
)
def test_pri_follows_alert_severity_or_log_level(record: dict[str, Any], pri: int) -> None:
    """critical..informational map to crit..info, health levels to err/warning/info; a
    missing or odd value falls back to info (warning for an alert)."""
    message, _ = SyslogSink("localhost:514").format(dumps(record))
    assert message.startswith(b"<%d>1 " % pri)


def test_facility_names_set_the_facility() -> None:
    message, _ = SyslogSink("localhost:514", facility="authpriv").format(dumps(alert(1)))
    assert message.startswith(b"<%d>1 " % (10 * 8 + 3))


def test_header_fields_are_printable_ascii_within_their_limits() -> None:
    """Spaces, control and non-ASCII characters leave a header field, which is then cut to its
    RFC 5424 length; an empty field is NILVALUE, a missing hostname is the agent's."""
    sink = SyslogSink("localhost:514", hostname="agent host")
    record = {
        "@timestamp": "yesterday",
        "event": {"kind": "a lert\n" + "k" * 40},
        "host": {"hostname": "h\u00e9 st" + "x" * 300},
    }
    match = RFC5424.fullmatch(sink.format(dumps(record))[0])
    assert match is not None
    assert match[3] == b"hst" + b"x" * 252
    assert match[6] == b"alert" + b"k" * 27
    no_host, _ = sink.format(dumps({"event": {"kind": ""}, "host": {"hostname": 5}}))
    match = RFC5424.fullmatch(no_host)
    assert match is not None
    assert (match[3], match[6]) == (b"agenthost", b"-")


def test_a_bad_timestamp_falls_back_to_now() -> None:
    sink = SyslogSink("localhost:514")
    for value in ("2026-02-30T00:00:00Z", "soon", 5):
        match = RFC5424.fullmatch(sink.format(dumps({"@timestamp": value}))[0])
        assert match is not None
        assert match[2].startswith(b"20") and match[2].endswith(b"Z")
        assert match[2] != str(value).encode()
    nanos = sink.format(dumps({"@timestamp": "2026-01-02T03:04:05.123456789+02:00"}))[0]
    assert b" 2026-01-02T03:04:05.123456+02:00 " in nanos


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "@timestamp": json_values,
        "event": st.fixed_dictionaries(
            {},
            optional={
                "kind": json_values,
                "id": json_values,
                "severity": json_values,
                "action": json_values,
            },
        ),
        "log": st.fixed_dictionaries({}, optional={"level": json_values}),
        "rule": st.fixed_dictionaries({}, optional={"id": json_values}),
        "user": st.fixed_dictionaries({}, optional={"name": json_values}),
        "file": st.fixed_dictionaries({}, optional={"path": json_values}),
        "host": st.fixed_dictionaries({}, optional={"hostname": json_values}),
        "pad": st.text(max_size=3000),
    },
)


@settings(max_examples=300, deadline=None)
@given(record=record_like, max_message=st.integers(480, 9000))
def test_any_record_gives_one_valid_message_within_the_limit(
    record: dict[str, Any], max_message: int
) -> None:
    """Whatever the fields hold (or lack), the message is RFC 5424, ASCII, one line, no longer
    than max_message, and MSG is valid JSON (the record or its stub)."""
    sink = SyslogSink("localhost:514", max_message=max_message)
    line = dumps(record)
    message, replaced = sink.format(line)
    assert len(message) <= max_message
    assert message.isascii() and b"\n" not in message
    match = RFC5424.fullmatch(message)
    assert match is not None, message
    msg = json.loads(match[8])
    if replaced:
        assert msg["exfilwatch"] == {"truncated": True, "size": len(line)}
    else:
        assert match[8] == line.encode()


def test_a_line_that_is_not_json_still_goes_out() -> None:
    sink = SyslogSink("localhost:514")
    for line in ("not json", "[1, 2]", '{"a": ' * 100_000):
        message, _ = sink.format(line)
        match = RFC5424.fullmatch(message)
        assert match is not None
        assert match[6] == b"-"
