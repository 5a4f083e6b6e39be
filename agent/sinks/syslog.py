"""Syslog sink: each record as one RFC 5424 message over UDP, TCP, TLS or RELP."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import select
import socket
import ssl
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any

import msgspec

from agent.events import format_timestamp
from agent.sinks.errors import DeliveryError

PROTOCOLS = ("udp", "tcp", "tls", "relp")

# Facility names as glibc's <syslog.h> and Python's SysLogHandler spell them.
FACILITIES: Mapping[str, int] = MappingProxyType(
    {
        "kern": 0,
        "user": 1,
        "mail": 2,
        "daemon": 3,
        "auth": 4,
        "syslog": 5,
        "lpr": 6,
        "news": 7,
        "uucp": 8,
        "cron": 9,
        "authpriv": 10,
        "ftp": 11,
        "ntp": 12,
        "security": 13,
        "console": 14,
        **{f"local{n}": 16 + n for n in range(8)},
    }
)

# event.severity (ECS, as alerts carry it) -> (syslog severity, label). A value between two
# steps counts as the lower one.
ALERT_SEVERITY: tuple[tuple[int, int, str], ...] = (
    (99, 2, "critical"),
    (73, 3, "high"),
    (47, 4, "medium"),
    (21, 5, "low"),
    (1, 6, "informational"),
)
LEVEL_SEVERITY: Mapping[str, int] = MappingProxyType({"error": 3, "warning": 4, "info": 6})
ALERT_DEFAULT_SEVERITY = 4  # an alert without a usable severity still wants a look
DEFAULT_SEVERITY = 6

# RFC 5612 reserves private enterprise number 32473 for documentation and examples. SD-IDs
# with "@" must carry an IANA enterprise number; a deployment with its own should use it here.
SD_ID = "exfilwatch@32473"
SD_VALUE_CAP = 1024  # characters of one SD-PARAM value, as a reader sees it after unescaping
SD_VALUE_CAP_SMALL = 64  # when a replacement message must fit a small maximum
STUB_VALUE_CAP = 128

# RFC 5424 section 6 header field limits (PROCID, 128, is our pid: always within).
HOSTNAME_MAX = 255
APP_NAME_MAX = 48
MSGID_MAX = 32

# rsyslog's default maxMessageSize is 8096 bytes, header included: a longer message is cut
# (UDP) or breaks octet-counted framing for the rest of the connection (TCP, measured on
# 8.2302). RFC 5426 asks every receiver to take 480 bytes (IPv4), which still fits the
# replacement for an oversized record.
DEFAULT_MAX_MESSAGE = 8096
MIN_MAX_MESSAGE = 480
MAX_MAX_MESSAGE = 65507  # the largest UDP payload over IPv4

# A collector that closes its end with bytes it has not read yet answers with a reset (RST)
# instead of a clean close (FIN); those bytes are gone although its kernel acknowledged them.
# So after a reset, or a failed write, the next connection first sends again the batches of
# the last REPLAY_BYTES (at least the last batch): duplicates, never a gap the sink could see.
REPLAY_BYTES = 1 << 20
RELP_WINDOW = 128  # frames in flight before waiting for acknowledgements (librelp's default)
RELP_CLOSE_WAIT = 1.0  # seconds close() waits for the server to confirm a RELP close
_RELP_FRAME = re.compile(rb"(\d{1,9}) ([A-Za-z]{1,32}) (\d{1,9})([ \n])")
_RELP_TXNR_MAX = 999_999_999

_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
_ADDRESS = re.compile(r"(?:\[([^\]]+)\]|([^:\[\]]+)):(\d{1,5})")
_ACK_POLL_MAX = 0.02  # seconds between two looks at the unacknowledged byte count

_decode = msgspec.json.Decoder().decode


class SyslogSink:
    """Sends each record as one RFC 5424 message to a syslog collector.

    The header carries what a collector routes on without parsing JSON: PRI from the alert's
    severity or the health record's log level, the record's own timestamp and host, MSGID the
    event kind, and one SD-ELEMENT with the alert id, action, rule, severity, user and path.
    MSG is the record's JSON line itself. Nothing connects before the first write, so the
    agent starts while the collector is down; any failure closes the connection, the next
    write opens a new one.

    What each protocol guarantees once `write` returns:

    - udp (RFC 5426): nothing. One datagram per record, no acknowledgement: a collector that
      is down or overloaded loses datagrams silently. The socket is connected, so the ICMP
      refusal of a port nobody listens on fails a later write (not the one that was lost).
    - tcp (RFC 6587 octet counting) and tls (RFC 5425): every byte reached the collector's
      kernel (on Linux the sink waits until the peer acknowledged all of it, one round trip
      plus the collector's delayed ACK per batch), so a collector that vanished, or closed
      the connection before the batch arrived, fails the write and the router sends the
      batch again. A collector that stops with acknowledged bytes still unread resets the
      connection: the next connection starts with the last batches again (`resent`).
      Not guaranteed: what the collector process read but had not queued when it stopped;
      syslog over TCP has no application-level acknowledgement.
    - relp (rsyslog's Reliable Event Logging Protocol, imrelp): every record was acknowledged
      by the collector after it took it into its queue. At-least-once to the collector's
      queue; whether that queue survives a restart is the collector's configuration. RELP
      runs over plain TCP here (no TLS).

    A failed write raises DeliveryError; the router retries the whole batch, so a collector
    may see a record twice (dedupe on event.id). A message longer than `max_message` bytes is
    replaced by a small JSON stub naming the record (see `_replacement`), counted in
    `truncated`: a collector cuts long messages, and over TCP rsyslog loses the framing.

    Counters for the router's stats: `sent` (records written), `truncated` (of those, sent as
    a stub), `reconnects`, `resent` (records sent again after a reset, TCP and TLS).

    `verify=False` turns TLS certificate checking off: the link is then encrypted but anyone
    on the path can pose as the collector. Only for tests and first setup.
    """

    def __init__(
        self,
        address: str,
        protocol: str = "udp",
        *,
        app_name: str = "exfilwatch",
        facility: str = "local0",
        hostname: str | None = None,
        ca_file: str | None = None,
        verify: bool = True,
        server_name: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 5.0,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"syslog protocol must be one of {', '.join(PROTOCOLS)}: {protocol!r}")
        self.host, self.port = parse_address(address)
        if facility not in FACILITIES:
            raise ValueError(
                f"unknown syslog facility {facility!r} (one of {', '.join(FACILITIES)})"
            )
        if _field(app_name, APP_NAME_MAX) != app_name:
            raise ValueError(
                f"syslog app_name must be 1-{APP_NAME_MAX} printable ASCII characters "
                f"without spaces: {app_name!r}"
            )
        if not MIN_MAX_MESSAGE <= max_message <= MAX_MAX_MESSAGE:
            raise ValueError(
                f"syslog max_message must be {MIN_MAX_MESSAGE}-{MAX_MAX_MESSAGE}: {max_message}"
            )
        if not timeout > 0:
            raise ValueError(f"syslog timeout must be positive: {timeout}")
        if key_file and not cert_file:
            raise ValueError("syslog key_file needs cert_file")
        self.name = f"syslog:{address}/{protocol}"
        self.address = address
        self.protocol = protocol
        self.app_name = app_name
        self.facility = FACILITIES[facility]
        self.hostname = _field(
            hostname if hostname is not None else socket.gethostname(), HOSTNAME_MAX
        )
        self.timeout = timeout
        self.max_message = max_message
        self._tls: dict[str, Any] = {
            "ca_file": ca_file,
            "verify": verify,
            "cert_file": cert_file,
            "key_file": key_file,
        }
        self._server_name = server_name or self.host
        if protocol == "tls":
            self._tls_context()  # a missing or unreadable CA or key fails here, not on first write
        self.sent = 0
        self.truncated = 0
        self.reconnects = 0
        self.resent = 0
        self._sock: socket.socket | None = None
        self._connections = 0
        # TCP/TLS: the last batches written, and whether to send them again on the next
        # connection (see REPLAY_BYTES).
        self._replay: deque[tuple[bytes, int]] = deque()
        self._replay_size = 0
        self._replay_due = False
        self._relp_txnr = 0
        self._relp_buffer = b""
        # The router writes from the sink's thread; close() may come from the agent's stop.
        self._lock = threading.Lock()

    # The router's side ----------------------------------------------------------------------

    def write(self, lines: Sequence[str]) -> None:
        """Deliver the batch or raise DeliveryError (the connection is then closed)."""
        if not lines:
            return
        messages: list[bytes] = []
        truncated = 0
        for line in lines:
            message, replaced = self.format(line)
            messages.append(message)
            truncated += replaced
        with self._lock:
            if self.protocol == "udp":
                self._write_udp(messages)
            elif self.protocol == "relp":
                self._write_relp(messages)
            else:
                self._write_stream(messages)
        self.truncated += truncated

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self.protocol == "relp":
                self._relp_close(self._sock)
            self._drop()

    # Formatting (pure) ----------------------------------------------------------------------

    def format(self, line: str) -> tuple[bytes, bool]:
        """One record line as an RFC 5424 message, and whether MSG had to be replaced because
        the message was longer than `max_message`."""
        record = _parse(line)
        header = self._header(record)
        # MSG is the JSON line as is: pure ASCII (the agent escapes every other character),
        # so without the UTF-8 BOM of MSG-UTF8 it reads the same whatever a receiver assumes,
        # and a SIEM can hand it straight to a JSON parser (a BOM makes most of them fail).
        msg = line.encode("ascii", "backslashreplace")
        sd = _structured_data(record, SD_VALUE_CAP)
        message = b"%s %s %s" % (header, sd, msg)
        if len(message) <= self.max_message:
            return message, False
        for cap, full in ((SD_VALUE_CAP, True), (SD_VALUE_CAP_SMALL, True), (0, True), (0, False)):
            sd = _structured_data(record, cap) if cap else b"-"
            message = b"%s %s %s" % (header, sd, _replacement(record, len(msg), full))
            if len(message) <= self.max_message:
                break
        return message, True

    def _header(self, record: Mapping[str, Any]) -> bytes:
        severity, _ = _severity(record)
        hostname = _field(_get(record, "host", "hostname"), HOSTNAME_MAX)
        if hostname == "-":
            hostname = self.hostname
        return b"<%d>1 %s %s %s %d %s" % (
            self.facility * 8 + severity,
            _timestamp(_get(record, "@timestamp")).encode("ascii"),
            hostname.encode("ascii"),
            self.app_name.encode("ascii"),
            os.getpid(),
            _field(_get(record, "event", "kind"), MSGID_MAX).encode("ascii"),
        )

    # UDP ------------------------------------------------------------------------------------

    def _write_udp(self, messages: Sequence[bytes]) -> None:
        sock = self._sock or self._connect()
        for message in messages:
            try:
                sock.send(message)
            except OSError as exc:
                self._drop()
                raise self._failure("send", exc) from exc
            self.sent += 1

    # TCP and TLS ----------------------------------------------------------------------------

    def _write_stream(self, messages: Sequence[bytes]) -> None:
        data = b"".join(b"%d %s" % (len(m), m) for m in messages)
        sock = self._stream()
        replay = list(self._replay) if self._replay_due else []
        try:
            sock.sendall(b"".join(chunk for chunk, _ in replay) + data)
            self._wait_acknowledged(sock)
        except OSError as exc:
            self._drop()
            self._replay_due = True
            raise self._failure("send", exc) from exc
        if replay:
            self.resent += sum(count for _, count in replay)
            self._replay_due = False
        self._remember(data, len(messages))
        self.sent += len(messages)

    def _stream(self) -> socket.socket:
        """The open connection, or a new one when there is none or the collector closed it
        since the last write (bytes sent into a closed connection would be lost)."""
        if self._sock is not None:
            state = _peer_state(self._sock, self._on_data)
            # A RELP server about to go away says so first (serverclose, txnr 0).
            if state == "open" and b" serverclose " not in self._relp_buffer:
                return self._sock
            self._drop()
            if state == "closed":
                # A clean close (FIN, not RST): the collector read every byte first.
                self._replay.clear()
                self._replay_size = 0
            else:
                self._replay_due = True
        return self._connect()

    def _remember(self, data: bytes, count: int) -> None:
        """Keep the last batches for a replay: at least the last one, older ones while they
        fit in REPLAY_BYTES."""
        self._replay.append((data, count))
        self._replay_size += len(data)
        while len(self._replay) > 1 and self._replay_size > REPLAY_BYTES:
            self._replay_size -= len(self._replay.popleft()[0])

    def _wait_acknowledged(self, sock: socket.socket) -> None:
        """Return once the peer's kernel acknowledged every byte sent (Linux SIOCOUTQ counts
        sent-but-unacknowledged bytes): a peer that vanished or closed fails this write, so
        the router resends the batch, instead of the bytes dying in our send buffer."""
        deadline = time.monotonic() + self.timeout
        pause = 0.0005
        while True:
            # Checked first and on every round: a reset connection keeps its unacknowledged
            # count (Linux 6.x), so only the reset itself tells that the bytes are gone.
            if _peer_state(sock, self._on_data) == "reset":
                raise ConnectionResetError(errno.ECONNRESET, "collector reset the connection")
            try:
                pending = _unacknowledged(sock)
            except OSError:
                return  # no such ioctl here: sent is the most we know
            if pending == 0:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, "collector did not acknowledge the batch")
            time.sleep(pause)
            pause = min(pause * 2, _ACK_POLL_MAX)

    def _on_data(self, data: bytes) -> None:
        """Bytes the collector sent on a syslog connection: ignored (plain syslog servers
        send nothing); RELP answers are read by `_relp_frame`, not here."""
        if self.protocol == "relp":
            self._relp_buffer += data

    # RELP -----------------------------------------------------------------------------------

    def _write_relp(self, messages: Sequence[bytes]) -> None:
        sock = self._stream()
        try:
            for start in range(0, len(messages), RELP_WINDOW):
                window = messages[start : start + RELP_WINDOW]
                expected: list[int] = []
                frames = []
                for message in window:
                    txnr = self._relp_next()
                    expected.append(txnr)
                    frames.append(b"%d syslog %d %s\n" % (txnr, len(message), message))
                sock.sendall(b"".join(frames))
                for txnr in expected:
                    self._relp_expect(sock, txnr)
                self.sent += len(window)
        except DeliveryError:
            self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise self._failure("send", exc) from exc

    def _relp_next(self) -> int:
        self._relp_txnr = self._relp_txnr % _RELP_TXNR_MAX + 1
        return self._relp_txnr

    def _relp_open(self, sock: socket.socket) -> None:
        offers = b"relp_version=0\nrelp_software=exfilwatch\ncommands=syslog"
        txnr = self._relp_next()
        sock.sendall(b"%d open %d %s\n" % (txnr, len(offers), offers))
        data = self._relp_expect(sock, txnr)
        if b"commands=syslog" not in data:
            raise DeliveryError("relp_refused", f"{self.name}: the server offers no syslog command")

    def _relp_expect(self, sock: socket.socket, txnr: int) -> bytes:
        """Read the response to `txnr`; anything but `200` fails the batch."""
        while True:
            got, command, data = self._relp_frame(sock)
            if command == b"serverclose":
                raise DeliveryError(
                    "connection_closed", f"{self.name}: the server closed the session"
                )
            if command != b"rsp":
                continue  # RELP servers send only rsp and serverclose; skip what we do not know
            if got != txnr:
                raise DeliveryError(
                    "relp_protocol_error", f"{self.name}: response to {got}, expected {txnr}"
                )
            if not data.startswith(b"200"):
                status = data.split(b"\n", 1)[0][:80].decode("ascii", "replace")
                raise DeliveryError("relp_refused", f"{self.name}: the server answered {status!r}")
            return data

    def _relp_frame(self, sock: socket.socket) -> tuple[int, bytes, bytes]:
        """The next frame from the server: (txnr, command, data)."""
        while True:
            match = _RELP_FRAME.match(self._relp_buffer)
            if match is not None:
                size = int(match[3])
                start = match.end()
                if match[4] == b"\n":
                    if size == 0:
                        self._relp_buffer = self._relp_buffer[start:]
                        return int(match[1]), match[2], b""
                    raise DeliveryError("relp_protocol_error", f"{self.name}: malformed frame")
                if len(self._relp_buffer) >= start + size + 1:
                    if self._relp_buffer[start + size : start + size + 1] != b"\n":
                        raise DeliveryError("relp_protocol_error", f"{self.name}: malformed frame")
                    data = self._relp_buffer[start : start + size]
                    self._relp_buffer = self._relp_buffer[start + size + 1 :]
                    return int(match[1]), match[2], data
            elif len(self._relp_buffer) > 64 or (
                self._relp_buffer and not self._relp_buffer[:1].isdigit()
            ):
                raise DeliveryError("relp_protocol_error", f"{self.name}: malformed frame")
            # librelp answers each frame with its own small write; without an immediate ACK
            # from us its Nagle holds the next answer for our delayed ACK (40 ms per window).
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = sock.recv(65536)
            if not chunk:
                raise DeliveryError(
                    "connection_closed", f"{self.name}: the server closed the session"
                )
            self._relp_buffer += chunk

    def _relp_close(self, sock: socket.socket) -> None:
        """Say goodbye so the server does not log a broken session; best effort, bounded."""
        try:
            sock.settimeout(min(self.timeout, RELP_CLOSE_WAIT))
            txnr = self._relp_next()
            sock.sendall(b"%d close 0\n" % txnr)
            self._relp_expect(sock, txnr)
        except OSError:
            pass

    # Connections ----------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=kind)
        except OSError as exc:
            raise self._failure("resolve", exc) from exc
        error: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(self.timeout)
                sock.connect(addr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            break
        else:
            raise self._failure("connect", error) from error
        if self.protocol == "tls":
            try:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self._server_name)
            except OSError as exc:
                sock.close()
                raise self._failure("tls", exc) from exc
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        self._relp_txnr = 0
        self._relp_buffer = b""
        if self._connections:
            self.reconnects += 1
        self._connections += 1
        if self.protocol == "relp":
            try:
                self._relp_open(sock)
            except DeliveryError:
                self._drop()
                raise
            except OSError as exc:
                self._drop()
                raise self._failure("relp open", exc) from exc
        return sock

    def _tls_context(self) -> ssl.SSLContext:
        """Built per connection, so a renewed CA or client certificate is read on reconnect."""
        context = ssl.create_default_context(cafile=self._tls["ca_file"])
        if not self._tls["verify"]:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self._tls["cert_file"]:
            context.load_cert_chain(self._tls["cert_file"], self._tls["key_file"])
        return context

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _failure(self, step: str, exc: OSError) -> DeliveryError:
        reason = _reason(exc, tls_step=step == "tls")
        detail = getattr(exc, "verify_message", None) or exc.strerror or str(exc)
        return DeliveryError(reason, f"{self.name}: {step} failed: {detail}")


# Helpers (pure) ---------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[IPV6]:PORT" -> (host, port); ValueError otherwise."""
    match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None or not 0 < int(match[3]) < 65536:
        raise ValueError(f"syslog address must be HOST:PORT or [IPV6]:PORT: {address!r}")
    return match[1] or match[2], int(match[3])


def _parse(line: str) -> Mapping[str, Any]:
    """The record as a dict, or an empty one: a line that is not a JSON object still goes
    out, with a default header."""
    try:
        record = _decode(line)
    except (msgspec.DecodeError, TypeError, ValueError, RecursionError):
        # msgspec refuses lone surrogates (\udc80, from an undecodable file name); json
        # takes them.
        try:
            record = json.loads(line)
        except (ValueError, TypeError, RecursionError):
            return {}
    return record if isinstance(record, dict) else {}


def _get(record: Mapping[str, Any], *keys: str) -> Any:
    value: Any = record
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _severity(record: Mapping[str, Any]) -> tuple[int, str]:
    """(syslog severity, label for the SD param or "")."""
    value = _get(record, "event", "severity")
    if isinstance(value, int | float) and not isinstance(value, bool):
        for threshold, severity, label in ALERT_SEVERITY:
            if value >= threshold:
                return severity, label
        return ALERT_SEVERITY[-1][1], ALERT_SEVERITY[-1][2]
    level = _get(record, "log", "level")
    if isinstance(level, str) and level in LEVEL_SEVERITY:
        return LEVEL_SEVERITY[level], ""
    if _get(record, "event", "kind") == "alert":
        return ALERT_DEFAULT_SEVERITY, ""
    return DEFAULT_SEVERITY, ""


def _field(value: Any, limit: int) -> str:
    """A header field: printable US-ASCII without spaces (RFC 5424 PRINTUSASCII), at most
    `limit` characters, NILVALUE "-" when nothing is left."""
    if not isinstance(value, str):
        return "-"
    if not (value.isascii() and value.isprintable() and " " not in value):
        value = "".join(c for c in value if "!" <= c <= "~")
    return value[:limit] or "-"


def _timestamp(value: Any) -> str:
    """The record's time as an RFC 5424 TIMESTAMP (RFC 3339, at most 6 fraction digits), or
    now when it is missing or not a real date."""
    if isinstance(value, str):
        match = _TIMESTAMP.fullmatch(value)
        if match is not None:
            try:
                datetime.fromisoformat(match[1])
            except ValueError:
                pass
            else:
                fraction = f".{match[2][:6]}" if match[2] else ""
                return f"{match[1]}{fraction}{match[3]}"
    return format_timestamp(time.time_ns() // 1000)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _escaped(value: str, cap: int) -> str:
    """`value` as it appears inside a JSON string (ASCII, control characters and non-ASCII
    as \\uXXXX), cut to at most `cap` characters without splitting an escape."""
    value = value[:cap]
    body = json.dumps(value)[1:-1]
    while len(body) > cap:
        value = value[: len(value) - (len(body) - cap)]  # every character takes at least one
        body = json.dumps(value)[1:-1]
    return body


def _structured_data(record: Mapping[str, Any], cap: int) -> bytes:
    """The one SD-ELEMENT. A value is written as it appears in the JSON MSG (so a newline in
    a file name is the two characters \\n, never a line break), then escaped per RFC 5424
    6.3.3 (`"`, `\\` and `]` get a backslash)."""
    _, label = _severity(record)
    params = (
        ("id", _text(_get(record, "event", "id"))),
        ("action", _text(_get(record, "event", "action"))),
        ("rule", _text(_get(record, "rule", "id"))),
        ("severity", label or None),
        ("user", _text(_get(record, "user", "name"))),
        ("path", _text(_get(record, "file", "path"))),
    )
    parts = [SD_ID]
    for name, value in params:
        if value:
            body = _escaped(value, cap)
            body = body.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
            parts.append(f'{name}="{body}"')
    if len(parts) == 1:
        return b"-"
    return ("[" + " ".join(parts) + "]").encode("ascii")


def _replacement(record: Mapping[str, Any], size: int, full: bool) -> bytes:
    """The MSG sent instead of a record too long for one message: a small JSON object with
    what identifies the record, and `exfilwatch.truncated` / `.size` (the record's length in
    bytes), so the collector knows a record exists and can fetch it from the agent's file."""
    fields: list[tuple[str, tuple[str, ...]]] = (
        [
            ("@timestamp", ("@timestamp",)),
            ("event", ("event", "id")),
            ("event", ("event", "kind")),
            ("event", ("event", "action")),
            ("rule", ("rule", "id")),
            ("host", ("host", "hostname")),
        ]
        if full
        else []
    )
    out: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for group, path in fields:
        value = _text(_get(record, *path))
        if value is None:
            continue
        text = f'"{_escaped(value, STUB_VALUE_CAP)}"'
        if len(path) == 1:
            out[group] = text
        else:
            groups.setdefault(group, []).append(f'"{path[-1]}":{text}')
    for group, members in groups.items():
        out[group] = "{" + ",".join(members) + "}"
    out["exfilwatch"] = f'{{"truncated":true,"size":{size}}}'
    return ("{" + ",".join(f'"{key}":{value}' for key, value in out.items()) + "}").encode("ascii")


def _peer_state(sock: socket.socket, on_data: Callable[[bytes], None]) -> str:
    """ "open", "closed" (the collector sent FIN) or "reset", without blocking. Bytes the
    collector sent are passed to `on_data`."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poller.poll(0):
        return "open"
    previous = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return "closed"
            on_data(data)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return "open"
    except OSError:
        return "reset"
    finally:
        sock.settimeout(previous)


def _unacknowledged(sock: socket.socket) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(buf, "little", signed=True)


def _reason(exc: OSError, *, tls_step: bool = False) -> str:
    """A stable code for health records."""
    if isinstance(exc, socket.gaierror):
        return "dns_error"
    if isinstance(exc, ssl.SSLError) and not (
        not tls_step and isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    ):
        return "tls_error"
    if isinstance(exc, ssl.SSLError):
        return "connection_reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "connection_reset"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if exc.errno == errno.EMSGSIZE:
        return "message_too_big"
    return "socket_error"
