"""A sink that POSTs record batches to a webhook, Splunk HEC or Elasticsearch/OpenSearch _bulk."""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from agent import __version__
from agent.sinks.errors import DeliveryError

FORMATS: Final = ("json", "hec", "bulk")
DEFAULT_BULK_INDEX: Final = "exfilwatch-alerts"
HEC_SOURCE: Final = "exfilwatch"

# Splunk HEC status codes (the `code` of the JSON answer) and the reason each becomes. Splunk
# documents 0-16 for the event endpoints ("Troubleshoot HTTP Event Collector"); HTTP statuses
# in the comments are the ones Splunk pairs with each code.
HEC_CODES: Final[Mapping[int, str]] = {
    1: "token_disabled",  # 403
    2: "token_required",  # 401
    3: "invalid_authorization",  # 401
    4: "invalid_token",  # 403
    5: "no_data",  # 400
    6: "invalid_data_format",  # 400
    7: "incorrect_index",  # 400: the token may not write to `index`
    8: "internal_server_error",  # 500
    9: "server_busy",  # 503: retryable, the router backs off
    10: "data_channel_missing",  # 400: indexer acknowledgement is on for the token
    11: "invalid_data_channel",  # 400
    12: "event_field_required",  # 400
    13: "event_field_blank",  # 400
    14: "ack_disabled",  # 400
    15: "indexed_fields_error",  # 400
    16: "query_string_auth_disabled",  # 400
}
_HEC_HINTS: Final[Mapping[int, str]] = {
    7: "; allow the index on the HEC token or change `index`",
    10: "; turn indexer acknowledgement off for this token (the sink does not poll /ack)",
    11: "; turn indexer acknowledgement off for this token (the sink does not poll /ack)",
}

# An answer body is read up to these sizes: a _bulk answer has one item per record (about
# 200 bytes each), other answers are only ever quoted. A longer body costs the connection.
_BULK_ANSWER_MAX = 64 * 1024 * 1024
_ANSWER_MAX = 1024 * 1024
_EXCERPT = 200
_ES_ID_MAX = 512  # Elasticsearch refuses a longer _id; such a record goes without one
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Headers the sink sets itself: a configured header may not replace them.
_OWN_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "user-agent"}
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")

# A kept-alive connection the server closed while idle fails like this on the next request;
# those (and only those) are retried once, at once, on a fresh connection. Time-outs are not:
# the server may be working on the batch, and waiting twice would double the stall.
_STALE = (
    ConnectionResetError,  # includes http.client.RemoteDisconnected
    BrokenPipeError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)
_UNREACHABLE = {errno.ENETUNREACH: "network_unreachable", errno.EHOSTUNREACH: "host_unreachable"}


class HttpSink:
    """POSTs each batch over one kept-alive HTTP(S) connection and returns only once the
    receiver has taken every record, so the router's outbox can let the batch go.

    Formats:
      * ``json``: a JSON array of the records (a generic webhook). ``token`` is sent as
        ``Authorization: Bearer``; ``username``/``password`` as Basic.
      * ``hec``: Splunk HTTP Event Collector events (``url`` is the full endpoint,
        ``.../services/collector/event``). ``token`` is required: ``Authorization: Splunk``.
      * ``bulk``: an Elasticsearch/OpenSearch ``_bulk`` request of ``create`` actions whose
        ``_id`` is the record's ``event.id``, so a resent record answers 409 and is stored once.
        ``token`` is an Elasticsearch API key as Elasticsearch returns it in ``encoded``
        (base64 of ``id:api_key``) and is sent as ``Authorization: ApiKey``; ``username``/
        ``password`` as Basic (OpenSearch, or Elasticsearch users).

    ``verify=False`` turns certificate checking off: anyone on the path can then read the
    alerts and the credential. It exists for a first test against a self-signed receiver;
    give ``ca_file`` instead. Delivery is at least once: a batch the router resends after an
    error may arrive twice (``bulk`` stores it once; HEC and webhooks see both copies).
    """

    def __init__(
        self,
        url: str,
        format: str = "json",
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        headers: Mapping[str, str] | None = None,
        ca_file: str | None = None,
        verify: bool = True,
        timeout: float = 10.0,
        index: str | None = None,
        sourcetype: str = "exfilwatch",
        max_batch_bytes: int = 5_000_000,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown http sink format {format!r} (one of {', '.join(FORMATS)})")
        if not timeout > 0:
            raise ValueError("timeout must be more than 0 seconds")
        if max_batch_bytes < 1:
            raise ValueError("max_batch_bytes must be at least 1")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError("the http sink URL must start with http:// or https://")
        if parts.username is not None or parts.password is not None:
            # Never echo the URL: it holds the credential this refuses.
            raise ValueError("credentials in the URL are not accepted; give username/password")
        host = parts.hostname
        if not host:
            raise ValueError("the http sink URL has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the http sink URL has an invalid port") from None
        if ca_file is not None and scheme != "https":
            raise ValueError("ca_file is given but the URL is not https://")

        self.format = format
        self.timeout = float(timeout)
        self.max_batch_bytes = max_batch_bytes
        self.index = index
        self.sourcetype = sourcetype
        shown = f"[{host}]" if ":" in host else host
        self._where = f"{shown}:{port if port is not None else (443 if scheme == 'https' else 80)}"
        self._endpoint = f"{scheme}://{shown}" + (f":{port}" if port is not None else "")
        self._endpoint += parts.path or "/"
        # The name keeps no credential and no query string (where webhooks put tokens).
        self.name = f"http:{self._endpoint}"
        self._host = host
        self._port = port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._tls: ssl.SSLContext | None = None
        if scheme == "https":
            self._tls = ssl.create_default_context(cafile=ca_file)
            if not verify:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

        self._secrets: tuple[str, ...] = ()
        auth = self._authorization(token, username, password)
        self._headers = self._build_headers(headers, auth is not None)
        # A configured header may carry a credential too (X-Api-Key, a custom Authorization):
        # its value is redacted from messages like the token (short values would garble them).
        self._secrets += tuple(
            v for k, v in (headers or {}).items() if len(v) >= 6 or k.lower() == "authorization"
        )
        # So may the query string (?token=...): a server quoting the request line back
        # must not put it into a message either.
        if parts.query:
            values = [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
            raw = [p.partition("=")[2] for p in parts.query.split("&")]
            self._secrets += (parts.query, *(v for v in values + raw if len(v) >= 6))
        # Longest first: a secret inside another must not leave the rest of that one.
        self._secrets = tuple(sorted({s for s in self._secrets if s}, key=len, reverse=True))
        if auth is not None:
            self._headers["Authorization"] = auth

        self._lock = threading.Lock()  # one write at a time
        self._conn_lock = threading.Lock()  # guards _conn and _closed against close()
        self._conn: http.client.HTTPConnection | None = None
        self._closed = False
        self.requests = 0  # HTTP requests sent, including failed ones
        self.sent = 0  # records the receiver took (for bulk, also those it already had)
        self.duplicates = 0  # bulk: records Elasticsearch already held (409)
        self.failures = 0  # write() calls that raised DeliveryError
        self.last_status: int | None = None  # HTTP status of the last answer
        self.last_error: str | None = None  # reason of the last failure

    def __repr__(self) -> str:
        return f"HttpSink({self.name!r}, format={self.format!r})"

    # Configuration ----------------------------------------------------------------------------

    def _authorization(
        self, token: str | None, username: str | None, password: str | None
    ) -> str | None:
        """The Authorization header value for the format; remembers every form of the secret
        so that a server echoing it back cannot put it into an error message."""
        if token is not None and (username is not None or password is not None):
            raise ValueError("give either token or username/password, not both")
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        if self.format == "hec" and token is None:
            raise ValueError("the hec format needs a token (a Splunk HEC token)")
        if token is not None:
            if (
                not token
                or not token.isascii()
                or not token.isprintable()
                or token != token.strip()
            ):
                raise ValueError("token must be printable ASCII without surrounding spaces")
            scheme = {"json": "Bearer", "hec": "Splunk", "bulk": "ApiKey"}[self.format]
            self._secrets = (token,)
            return f"{scheme} {token}"
        if username is not None and password is not None:
            if ":" in username or not username.isprintable():
                raise ValueError("username must be printable and may not contain ':'")
            if not password.isprintable():
                raise ValueError("password must be printable")
            encoded = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._secrets = tuple(s for s in (password, encoded) if s)
            return f"Basic {encoded}"
        return None

    @staticmethod
    def _build_headers(extra: Mapping[str, str] | None, has_auth: bool) -> dict[str, str]:
        """Checked extra headers plus the sink's own. Checked here so that a bad header is a
        configuration error, not a failure on every batch (and http.client would quote it)."""
        own = {"User-Agent": f"exfilwatch/{__version__}", "Accept": "application/json"}
        for name, value in (extra or {}).items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"invalid HTTP header name {name!r}")
            if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
                raise ValueError(f"header {name}: value must be printable ASCII on one line")
            lower = name.lower()
            if lower in _OWN_HEADERS or (has_auth and lower == "authorization"):
                raise ValueError(f"header {name} is set by the sink and cannot be configured")
            own = {k: v for k, v in own.items() if k.lower() != lower}
            own[name] = value
        return own

    # Delivery ---------------------------------------------------------------------------------

    def write(self, lines: Sequence[str]) -> None:
        """Deliver every line or raise DeliveryError. A batch over max_batch_bytes goes as
        several requests; any failing one fails the whole write (the router resends it all)."""
        if not lines:
            return
        with self._lock:
            try:
                for body, count in self._bodies(lines):
                    self._deliver(body, count)
            except DeliveryError as exc:
                self.failures += 1
                self.last_error = exc.reason
                raise

    def close(self) -> None:
        """Drop the connection; a write blocked on it fails at once. The sink is done."""
        with self._conn_lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            _shut(conn)

    def stats(self) -> dict[str, Any]:
        """The counters, for the router's stats() and health records."""
        return {
            "requests": self.requests,
            "sent": self.sent,
            "duplicates": self.duplicates,
            "failures": self.failures,
            "last_status": self.last_status,
            "last_error": self.last_error,
        }

    def _bodies(self, lines: Sequence[str]) -> Iterator[tuple[bytes, int]]:
        """Request bodies of at most max_batch_bytes (a single larger record goes alone)."""
        if self.format == "json":
            pieces = [_encode(line) for line in lines]
            head, sep, tail = b"[", b",", b"]"
        else:
            pieces = [
                self._hec_piece(line) if self.format == "hec" else self._bulk_piece(line)
                for line in lines
            ]
            head, sep, tail = b"", b"", b""
        group: list[bytes] = []
        size = len(head) + len(tail)
        for piece in pieces:
            extra = len(piece) + (len(sep) if group else 0)
            if group and size + extra > self.max_batch_bytes:
                yield head + sep.join(group) + tail, len(group)
                group, size = [], len(head) + len(tail)
                extra = len(piece)
            group.append(piece)
            size += extra
        if group:
            yield head + sep.join(group) + tail, len(group)

    def _hec_piece(self, line: str) -> bytes:
        """One HEC event: Splunk's envelope around the record, spliced in unchanged."""
        record = _parse(line)
        meta: dict[str, Any] = {}
        stamp = _epoch_text(_dig(record, "@timestamp"))
        hostname = _dig(record, "host", "hostname")
        if isinstance(hostname, str) and hostname:
            meta["host"] = hostname
        meta["source"] = HEC_SOURCE
        meta["sourcetype"] = self.sourcetype
        if self.index is not None:
            meta["index"] = self.index
        envelope = json.dumps(meta, separators=(",", ":"))[:-1]
        if stamp is not None:
            # The time goes in as text from whole microseconds: a float would round.
            envelope = '{"time":' + stamp + "," + envelope[1:]
        event = line if record is not None else json.dumps(line)
        return _encode(envelope + ',"event":' + event + "}\n")

    def _bulk_piece(self, line: str) -> bytes:
        """A create action and the record. Without a usable event.id there is no _id:
        Elasticsearch then makes one, and a resent copy of that record is stored twice."""
        record = _parse(line)
        action: dict[str, str] = {"_index": self.index or DEFAULT_BULK_INDEX}
        event_id = _dig(record, "event", "id")
        if isinstance(event_id, str) and event_id and len(event_id.encode()) <= _ES_ID_MAX:
            action["_id"] = event_id
        # A line that is not a JSON object (never from the agent) still goes, as a string.
        document = line if record is not None else json.dumps({"message": line})
        return _encode(
            json.dumps({"create": action}, separators=(",", ":")) + "\n" + document + "\n"
        )

    def _deliver(self, body: bytes, count: int) -> None:
        status, phrase, location, answer = self._exchange(body)
        self.last_status = status
        if 300 <= status < 400:
            raise DeliveryError(
                f"http_{status}",
                f"{self._endpoint} answered {self._status(status, phrase)}, a redirect to "
                f"{_origin(location)}; redirects are not followed: configure the final URL",
            )
        if self.format == "hec":
            self._judge_hec(status, phrase, answer)
        elif self.format == "bulk":
            self.duplicates += self._judge_bulk(status, phrase, answer, count)
        elif not 200 <= status < 300:
            said = self._excerpt(answer)
            raise DeliveryError(
                f"http_{status}",
                f"{self._endpoint} answered {self._status(status, phrase)}: {said}",
            )
        self.sent += count

    def _judge_hec(self, status: int, phrase: str, answer: bytes) -> None:
        """HEC took the batch only on a 2xx with code 0; otherwise its code names the cause."""
        parsed = _json_object(answer)
        code = parsed.get("code") if parsed is not None else None
        if not isinstance(code, int) or isinstance(code, bool):
            code = None
        if 200 <= status < 300 and code == 0:
            return
        text = parsed.get("text") if parsed is not None else None
        said = self._sanitize(text) if isinstance(text, str) else self._excerpt(answer)
        if code is not None and code != 0:
            reason = "hec_" + HEC_CODES.get(code, f"code_{code}")
            raise DeliveryError(
                reason,
                f"{self._endpoint} answered HTTP {status}, HEC code {code} ({said})"
                + _HEC_HINTS.get(code, ""),
            )
        if 200 <= status < 300:
            raise DeliveryError(
                "bad_response",
                f"{self._endpoint} answered HTTP {status} without HEC code 0: {said}",
            )
        raise DeliveryError(
            f"http_{status}", f"{self._endpoint} answered {self._status(status, phrase)}: {said}"
        )

    def _judge_bulk(self, status: int, phrase: str, answer: bytes, count: int) -> int:
        """The number of records Elasticsearch already had (409, delivered before). _bulk
        answers 200 even when items fail, so every item's status is checked. Only error
        types are quoted: an Elasticsearch error reason can quote the document."""
        parsed = _json_object(answer)
        if not 200 <= status < 300:
            error = parsed.get("error") if parsed is not None else None
            kind = error.get("type") if isinstance(error, dict) else None
            said = (
                f"error type {self._sanitize(kind)}"
                if isinstance(kind, str)
                else (self._excerpt(answer) if parsed is None else "no error type")
            )
            raise DeliveryError(
                f"http_{status}",
                f"{self._endpoint} answered {self._status(status, phrase)}: {said}",
            )
        items = parsed.get("items") if parsed is not None else None
        if not isinstance(items, list) or len(items) != count:
            got = len(items) if isinstance(items, list) else "no"
            raise DeliveryError(
                "bad_response",
                f"{self._endpoint} answered a _bulk request of {count} records with {got} items",
            )
        created = duplicates = failed = 0
        first = ""
        for item in items:
            result = next(iter(item.values()), None) if isinstance(item, dict) else None
            item_status = result.get("status") if isinstance(result, dict) else None
            if not isinstance(item_status, int):
                raise DeliveryError(
                    "bad_response", f"{self._endpoint} answered a _bulk item without a status"
                )
            if 200 <= item_status < 300:
                created += 1
            elif item_status == 409:  # create of an _id it holds: stored by an earlier send
                duplicates += 1
            else:
                failed += 1
                if not first:
                    assert isinstance(result, dict)
                    error = result.get("error")
                    kind = error.get("type") if isinstance(error, dict) else None
                    name = self._sanitize(kind) if isinstance(kind, str) else "unknown"
                    first = f"{name} (status {item_status})"
        if failed:
            raise DeliveryError(
                "bulk_item_errors",
                f"{self._endpoint} refused {failed} of {count} records ({created} created, "
                f"{duplicates} already present); first error: {first}",
            )
        return duplicates

    # Connection -------------------------------------------------------------------------------

    def _exchange(self, body: bytes) -> tuple[int, str, str | None, bytes]:
        """One POST and its answer: status, reason phrase, Location, body."""
        limit = _BULK_ANSWER_MAX if self.format == "bulk" else _ANSWER_MAX
        headers = {**self._headers, "Content-Type": _CONTENT_TYPES[self.format]}
        for attempt in range(2):
            conn, reused = self._connection()
            self.requests += 1
            try:
                conn.request("POST", self._target, body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read(limit + 1)
            except _STALE as exc:
                self._drop(conn)
                if reused and attempt == 0:
                    continue
                raise self._failure(exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop(conn)
                raise self._failure(exc) from exc
            if not response.isclosed():  # the answer was longer than we read
                self._drop(conn)
            return response.status, response.reason, response.getheader("Location"), answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """The kept-alive connection (and whether it has carried a request), or a new one."""
        with self._conn_lock:
            if self._closed:
                raise DeliveryError("sink_closed", f"{self.name} is closed")
            if self._conn is None:
                if self._tls is not None:
                    self._conn = http.client.HTTPSConnection(
                        self._host, self._port, timeout=self.timeout, context=self._tls
                    )
                else:
                    self._conn = http.client.HTTPConnection(
                        self._host, self._port, timeout=self.timeout
                    )
            # http.client reconnects by itself after a `Connection: close` answer.
            return self._conn, self._conn.sock is not None

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        with self._conn_lock:
            if self._conn is conn:
                self._conn = None
        conn.close()

    def _failure(self, exc: BaseException) -> DeliveryError:
        """A transport error as a DeliveryError with a stable reason."""
        where = self._where
        if isinstance(exc, TimeoutError):
            return DeliveryError(
                "timeout", f"no answer from {where} within {self.timeout:g} s ({self._endpoint})"
            )
        if isinstance(exc, ssl.SSLError):  # includes certificate verification
            reason = "tls_error"
        elif isinstance(exc, socket.gaierror):
            reason = "dns_error"
        elif isinstance(exc, ConnectionRefusedError):
            reason = "connection_refused"
        elif isinstance(exc, http.client.RemoteDisconnected):
            reason = "connection_closed"
        elif isinstance(exc, ConnectionError):
            reason = "connection_reset"
        elif isinstance(exc, http.client.HTTPException):
            reason = "bad_response"
        elif isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
            reason = _UNREACHABLE[exc.errno]
        else:
            reason = "connection_error"
        said = self._sanitize(str(exc)) or type(exc).__name__
        if self._closed:
            reason, said = "sink_closed", "the sink was closed"
        return DeliveryError(reason, f"{reason.replace('_', ' ')} to {where}: {said}")

    # Quoting ----------------------------------------------------------------------------------

    def _sanitize(self, text: str) -> str:
        """Printable ASCII on one line, credentials redacted, at most about 200 characters."""
        text = self._redact(text)
        text = "".join(c if " " <= c <= "~" else " " for c in text)
        text = self._redact(" ".join(text.split()))
        return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."

    def _status(self, status: int, phrase: str) -> str:
        phrase = self._sanitize(phrase)
        return f"HTTP {status} {phrase}" if phrase else f"HTTP {status}"

    def _excerpt(self, answer: bytes) -> str:
        return self._sanitize(answer.decode("ascii", "replace")) or "(empty body)"

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


_CONTENT_TYPES: Final[Mapping[str, str]] = {
    "json": "application/json",
    "hec": "application/json",
    "bulk": "application/x-ndjson",
}


def _encode(text: str) -> bytes:
    """UTF-8 (the agent's lines are ASCII). A lone surrogate, which only a line not made by
    `events.dumps` can hold, becomes its own JSON escape (\\udcff) instead of an error."""
    return text.encode("utf-8", "backslashreplace")


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _json_object(answer: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(answer)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _dig(record: dict[str, Any] | None, *keys: str) -> Any:
    value: Any = record
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _epoch_text(stamp: Any) -> str | None:
    """Seconds since the epoch, as JSON number text, from an ISO 8601 @timestamp."""
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    micros = (when - _EPOCH) // _US
    if micros < 0:
        return None
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{seconds}.{fraction:06d}"


def _origin(location: str | None) -> str:
    """Scheme and host of a redirect target: its path or query may carry a token."""
    if not location:
        return "an unknown location"
    parts = urlsplit(location)
    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "an unparsable location"
    if not host:
        return "a path on the same server"
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")


def _shut(conn: http.client.HTTPConnection) -> None:
    """Close a connection another thread may be blocked on: shutdown wakes its recv."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already shut by the peer
            sock.shutdown(socket.SHUT_RDWR)
    conn.close()
