"""The HTTP sink delivers whole batches to a real local server, or says why it could not."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.events import dumps
from agent.sinks.errors import DeliveryError
from agent.sinks.http import HttpSink

# Credentials that must never show up in a name or a message (test values, not secrets).
TOKEN = "tok-3f9a1c77e2b54d0a9e51"  # noqa: S105
PASSWORD = "pw-8d1e0b6a4c"  # noqa: S105
HANG_TIMEOUT = 0.5
# How late a time-out may come on a loaded 2-core machine (scheduling, TLS, thread start).
MARGIN = 4.0


# A scripted receiver ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server read it."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    connection: int  # which TCP connection carried it (1, 2, ... in accept order)


@dataclass
class Reply:
    """What the server does with the next request."""

    status: int = 200
    body: bytes | Callable[[Seen], bytes] = b'{"ok":true}'
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # read the request, never answer (until the test ends)
    drop: bool = False  # answer, then close the connection without announcing it


class Receiver:
    """A ThreadingHTTPServer on 127.0.0.1 (TLS optional) that answers from a script and
    records every request. Stopped, with all its threads joined, at the end of the test."""

    def __init__(self, tls: ssl.SSLContext | None = None, default: Reply | None = None) -> None:
        self.replies: deque[Reply] = deque()
        self.default = default or Reply()
        self.seen: list[Seen] = []
        self.release = threading.Event()  # ends every hang
        self.request_seen = threading.Event()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # an idle kept-alive connection cannot outlive a forgotten test

            def setup(self) -> None:
                with receiver._lock:
                    receiver.connections += 1
                    self.number = receiver.connections
                    receiver._threads.append(threading.current_thread())
                    receiver._sockets.append(self.request)
                if tls is not None:
                    self.request.settimeout(10)
                    self.request = tls.wrap_socket(self.request, server_side=True)
                    with receiver._lock:
                        receiver._sockets.append(self.request)
                super().setup()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen = Seen(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body, self.number
                )
                with receiver._lock:
                    receiver.seen.append(seen)
                    reply = receiver.replies.popleft() if receiver.replies else receiver.default
                receiver.request_seen.set()
                if reply.hang:
                    receiver.release.wait(30)
                    self.close_connection = True
                    return
                payload = reply.body(seen) if callable(reply.body) else reply.body
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if reply.drop:
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                receiver.errors.append(sys.exc_info()[1] or RuntimeError("unknown"))

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        self._serve = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-receiver"
        )
        self._serve.start()

    def url(self, path: str = "/ingest", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [s.body for s in self.seen]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:  # wakes a handler waiting for the next kept-alive request
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.server.server_close()
        self._serve.join(10)
        for thread in threads:
            thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(tls: ssl.SSLContext | None = None, default: Reply | None = None) -> Receiver:
        receiver = Receiver(tls, default)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def receiver(serve: Callable[..., Receiver]) -> Receiver:
    return serve()


@pytest.fixture
def make_sink() -> Iterator[Callable[..., HttpSink]]:
    """HttpSink(...) that is closed at the end of the test (so server threads end too)."""
    made: list[HttpSink] = []

    def make(url: str, format: str = "json", **kw: Any) -> HttpSink:
        kw.setdefault("timeout", 10.0)
        sink = HttpSink(url, format, **kw)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


# Records ---------------------------------------------------------------------------------------


def alert(n: int, path: str = "/srv/rnd/design.step") -> dict[str, Any]:
    return {
        "@timestamp": f"2026-03-01T12:00:{n % 60:02d}.{n:06d}Z",
        "event": {"kind": "alert", "id": f"{n:032x}", "severity": 73},
        "rule": {"id": "copy-to-usb", "name": "Tagged file copied to removable media"},
        "host": {"hostname": "ws-17"},
        "file": {"path": path},
    }


def heartbeat() -> dict[str, Any]:
    """A health record as the agent writes it: no event.id."""
    return {
        "@timestamp": "2026-11-29T12:28:14.967145Z",
        "event": {"kind": "metric", "action": "heartbeat", "dataset": "exfilwatch.health"},
        "log": {"level": "info"},
        "host": {"hostname": "vm"},
        "exfilwatch": {"health": {"uptime_s": 4.5, "pipeline": {"queued": 0}}},
    }


def lines_of(records: list[dict[str, Any]]) -> list[str]:
    return [dumps(r) for r in records]


def hec_events(body: bytes, exact: bool = False) -> list[dict[str, Any]]:
    """Splunk's reading of a HEC body: JSON objects one after another (exact: numbers with a
    fraction as Decimal, to check a time to the microsecond)."""
    decoder = json.JSONDecoder(parse_float=Decimal) if exact else json.JSONDecoder()
    text, at = body.decode("ascii"), 0
    events: list[dict[str, Any]] = []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return events
        event, at = decoder.raw_decode(text, at)
        events.append(event)


def bulk_pairs(body: bytes) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    assert body.endswith(b"\n"), "a _bulk body must end with a newline"
    rows = [json.loads(line) for line in body.decode("ascii").split("\n")[:-1]]
    assert len(rows) % 2 == 0
    return list(zip(rows[::2], rows[1::2], strict=True))


def received(format: str, body: bytes) -> list[dict[str, Any]]:
    """The records a request body carries, in order, whatever the format."""
    if format == "json":
        records = json.loads(body)
        assert isinstance(records, list)
        return records
    if format == "hec":
        return [e["event"] for e in hec_events(body)]
    return [doc for _, doc in bulk_pairs(body)]


def epoch(stamp: str) -> Decimal:
    """Exact seconds since the epoch of an ISO 8601 UTC time (whole microseconds)."""
    when = datetime.fromisoformat(stamp)
    micros = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return Decimal(micros) / Decimal(1_000_000)


class FakeElastic:
    """The part of Elasticsearch's _bulk that matters here: `create` with an _id it already
    holds answers 409; ids in `refuse` are refused once with `refusal`."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.anonymous: list[dict[str, Any]] = []
        self.refuse: dict[str, tuple[int, str, str]] = {}

    def __call__(self, seen: Seen) -> bytes:
        items = []
        for action, doc in bulk_pairs(seen.body):
            meta = action["create"]
            doc_id = meta.get("_id")
            if doc_id in self.refuse:
                status, kind, why = self.refuse.pop(doc_id)
                result = {"status": status, "error": {"type": kind, "reason": why}}
            elif doc_id is None:
                self.anonymous.append(doc)
                result = {"status": 201, "result": "created"}
            elif doc_id in self.docs:
                result = {
                    "status": 409,
                    "error": {"type": "version_conflict_engine_exception", "reason": "exists"},
                }
            else:
                self.docs[doc_id] = doc
                result = {"status": 201, "result": "created"}
            items.append({"create": {"_index": meta["_index"], "_id": doc_id, **result}})
        errors = any(i["create"]["status"] >= 300 for i in items)
        return json.dumps({"took": 3, "errors": errors, "items": items}).encode()


# Formats ---------------------------------------------------------------------------------------


def test_json_posts_the_batch_as_a_json_array_of_the_records(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """json: one POST, Content-Type application/json, the body an array equal to the records,
    the token as a Bearer credential, and the query string of the URL kept."""
    records = [alert(1), alert(2), heartbeat()]
    sink = make_sink(receiver.url("/hook?channel=sec"), token=TOKEN)
    sink.write(lines_of(records))
    [seen] = receiver.seen
    assert seen.path == "/hook?channel=sec"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(seen.body) == records
    assert (sink.requests, sink.sent, sink.failures, sink.last_status) == (1, 3, 0, 200)


def test_json_username_and_password_go_as_basic_auth(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """username/password become an RFC 7617 Basic credential."""
    sink = make_sink(receiver.url(), username="exfilwatch", password=PASSWORD)
    sink.write(lines_of([alert(1)]))
    scheme, encoded = receiver.seen[0].headers["authorization"].split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"exfilwatch:{PASSWORD}"


def test_configured_headers_are_sent(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """Extra headers from the configuration go with every request."""
    sink = make_sink(receiver.url(), headers={"X-Tenant": "rnd-eu"})
    sink.write(lines_of([alert(1)]))
    assert receiver.seen[0].headers["x-tenant"] == "rnd-eu"


def test_hec_wraps_each_record_in_an_event_with_its_time_host_and_index(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """hec: one event object per record with the exact @timestamp as epoch seconds,
    host.hostname as host, source/sourcetype/index, and the record itself as event."""
    receiver.default = Reply(200, b'{"text":"Success","code":0}')
    records = [alert(1), alert(2), heartbeat()]
    sink = make_sink(
        receiver.url("/services/collector/event"),
        "hec",
        token=TOKEN,
        index="insider",
        sourcetype="exfilwatch:alert",
    )
    sink.write(lines_of(records))
    [seen] = receiver.seen
    assert seen.headers["authorization"] == f"Splunk {TOKEN}"
    events = hec_events(seen.body)
    assert [e["event"] for e in events] == records
    for event, record in zip(hec_events(seen.body, exact=True), records, strict=True):
        assert event["time"] == epoch(record["@timestamp"])
        assert event["host"] == record["host"]["hostname"]
        assert (event["source"], event["sourcetype"]) == ("exfilwatch", "exfilwatch:alert")
        assert event["index"] == "insider"


def test_hec_leaves_out_time_and_host_a_record_does_not_have(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """A record without @timestamp or host.hostname still goes; Splunk fills in its own, and
    no index is named unless configured."""
    receiver.default = Reply(200, b'{"text":"Success","code":0}')
    record = {"event": {"kind": "state", "action": "heartbeat"}, "host": "not-an-object"}
    sink = make_sink(receiver.url(), "hec", token=TOKEN)
    sink.write([dumps(record)])
    [event] = hec_events(receiver.seen[0].body)
    assert event == {"source": "exfilwatch", "sourcetype": "exfilwatch", "event": record}


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (403, b'{"text":"Invalid token","code":4}', "hec_invalid_token"),
        (403, b'{"text":"Token disabled","code":1}', "hec_token_disabled"),
        (503, b'{"text":"Server is busy","code":9}', "hec_server_busy"),
        (400, b'{"text":"Incorrect index","code":7}', "hec_incorrect_index"),
        (400, b'{"text":"Data channel is missing","code":10}', "hec_data_channel_missing"),
        (200, b'{"text":"Something new","code":99}', "hec_code_99"),
        (200, b"<html>proxy login</html>", "bad_response"),
        (502, b"<html>Bad Gateway</html>", "http_502"),
    ],
)
def test_hec_refusals_name_the_hec_code(
    receiver: Receiver,
    make_sink: Callable[..., HttpSink],
    status: int,
    body: bytes,
    reason: str,
) -> None:
    """HEC took the batch only on HTTP 2xx with code 0; otherwise the reason names its code
    (or the HTTP status when the answer is not HEC's), and the message quotes HEC's text."""
    receiver.default = Reply(status, body)
    sink = make_sink(receiver.url(), "hec", token=TOKEN)
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    assert info.value.reason == reason
    assert f"HTTP {status}" in str(info.value)
    assert (sink.sent, sink.failures, sink.last_status) == (0, 1, status)


def test_bulk_sends_create_actions_keyed_by_event_id(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """bulk: NDJSON ending in a newline, a create action per record with _id = event.id
    (none for a record without one), the token as an Elasticsearch ApiKey."""
    elastic = FakeElastic()
    receiver.default = Reply(200, elastic)
    records = [alert(1), heartbeat(), alert(2)]
    sink = make_sink(receiver.url("/_bulk"), "bulk", token=TOKEN)
    sink.write(lines_of(records))
    [seen] = receiver.seen
    assert seen.headers["content-type"] == "application/x-ndjson"
    assert seen.headers["authorization"] == f"ApiKey {TOKEN}"
    pairs = bulk_pairs(seen.body)
    assert [doc for _, doc in pairs] == records
    assert [action for action, _ in pairs] == [
        {"create": {"_index": "exfilwatch-alerts", "_id": alert(1)["event"]["id"]}},
        {"create": {"_index": "exfilwatch-alerts"}},
        {"create": {"_index": "exfilwatch-alerts", "_id": alert(2)["event"]["id"]}},
    ]
    assert (sink.sent, sink.duplicates) == (3, 0)


def test_bulk_uses_the_configured_index_and_basic_auth(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """`index` names the target index (or data stream); username/password go as Basic."""
    receiver.default = Reply(200, FakeElastic())
    sink = make_sink(
        receiver.url("/_bulk"), "bulk", index="logs-exfilwatch", username="u", password=PASSWORD
    )
    sink.write(lines_of([alert(1)]))
    [(action, _)] = bulk_pairs(receiver.seen[0].body)
    assert action["create"]["_index"] == "logs-exfilwatch"
    assert receiver.seen[0].headers["authorization"].startswith("Basic ")


def test_bulk_item_refusal_fails_the_batch_and_a_resend_stores_each_record_once(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """_bulk answers 200 even when an item fails: one item refused with 429 fails the batch
    (bulk_item_errors, with counts and the error type); resending the whole batch then
    stores the refused record, and the ones stored before answer 409 and count as sent."""
    elastic = FakeElastic()
    receiver.default = Reply(200, elastic)
    records = [alert(n) for n in range(1, 6)]
    elastic.refuse[records[2]["event"]["id"]] = (
        429,
        "es_rejected_execution_exception",
        "rejected execution of coordinating operation",
    )
    sink = make_sink(receiver.url("/_bulk"), "bulk")
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of(records))
    assert info.value.reason == "bulk_item_errors"
    message = str(info.value)
    assert "1 of 5" in message
    assert "4 created" in message
    assert "es_rejected_execution_exception (status 429)" in message
    assert sink.sent == 0

    sink.write(lines_of(records))
    assert sorted(elastic.docs) == sorted(r["event"]["id"] for r in records)
    assert list(elastic.docs.values()) == [records[n] for n in (0, 1, 3, 4, 2)]
    assert (sink.sent, sink.duplicates, sink.failures) == (5, 4, 1)


def test_bulk_error_message_names_the_error_type_never_the_document(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """Elasticsearch's error reason can quote the document; only the type is repeated."""
    elastic = FakeElastic()
    receiver.default = Reply(200, elastic)
    record = alert(1, path="/srv/rnd/secret-roadmap.docx")
    elastic.refuse[record["event"]["id"]] = (
        400,
        "document_parsing_exception",
        "failed to parse field [file.path]. Preview of field's value: '/srv/rnd/secret-roadmap'",
    )
    sink = make_sink(receiver.url("/_bulk"), "bulk")
    with pytest.raises(DeliveryError) as info:
        sink.write([dumps(record)])
    assert info.value.reason == "bulk_item_errors"
    assert "document_parsing_exception (status 400)" in str(info.value)
    assert "secret-roadmap" not in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b'{"took":1,"errors":false,"items":[]}', "bad_response"),
        (200, b"not json", "bad_response"),
        (413, b'{"error":{"type":"content_too_long_exception","reason":"..."}}', "http_413"),
        (429, b'{"error":{"type":"es_rejected_execution_exception"},"status":429}', "http_429"),
    ],
)
def test_bulk_answers_that_do_not_account_for_every_record_fail(
    receiver: Receiver,
    make_sink: Callable[..., HttpSink],
    status: int,
    body: bytes,
    reason: str,
) -> None:
    """An answer without one item per record, or an HTTP error, is a failure."""
    receiver.default = Reply(status, body)
    sink = make_sink(receiver.url("/_bulk"), "bulk")
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1), alert(2)]))
    assert info.value.reason == reason


@pytest.mark.parametrize("format", ["hec", "bulk"])
def test_a_line_that_is_not_a_json_object_still_goes_as_a_string(
    receiver: Receiver, make_sink: Callable[..., HttpSink], format: str
) -> None:
    """hec and bulk read fields from each record; a line that is not JSON (never one the
    agent wrote) is sent as a string rather than breaking the whole request."""
    receiver.default = Reply(200, FakeElastic() if format == "bulk" else b'{"code":0}')
    sink = make_sink(receiver.url(), format, token=TOKEN)
    sink.write(["not json {", dumps(alert(1))])
    got = received(format, receiver.seen[0].body)
    assert got[1] == alert(1)
    assert "not json {" in json.dumps(got[0])


# Failures and recovery ---------------------------------------------------------------------------


def test_a_server_error_raises_http_500_with_a_short_printable_excerpt(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """HTTP 500: reason http_500; the message quotes the body only as ~200 printable ASCII."""
    body = b"\x1b[31mboom\x1b[0m\ninternal\r\n\x00" + b"x" * 5000 + "é".encode()
    receiver.default = Reply(500, body)
    sink = make_sink(receiver.url())
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    message = str(info.value)
    assert info.value.reason == "http_500"
    assert isinstance(info.value, OSError)
    assert "boom" in message
    assert message.isascii() and message.isprintable()
    assert "\x1b" not in message
    assert len(message) < 400
    assert (sink.requests, sink.sent, sink.failures, sink.last_status) == (1, 0, 1, 500)


def test_a_hang_times_out_within_the_timeout(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """A server that reads the batch and never answers: reason timeout, after about `timeout`
    seconds, never retried (the stall is not doubled)."""
    receiver.default = Reply(hang=True)
    sink = make_sink(receiver.url(), timeout=HANG_TIMEOUT)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    elapsed = time.monotonic() - started
    assert info.value.reason == "timeout"
    assert HANG_TIMEOUT * 0.9 <= elapsed < HANG_TIMEOUT + MARGIN
    assert len(receiver.seen) == 1


def test_after_failures_the_same_sink_delivers_again(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """500, then a hang, then 200: the same sink object fails twice, then delivers on a new
    connection (the one the hang spoiled is not reused)."""
    receiver.script(Reply(500, b"down"), Reply(hang=True), Reply(200))
    sink = make_sink(receiver.url(), timeout=HANG_TIMEOUT)
    records = [alert(1), alert(2)]
    batch = lines_of(records)
    reasons = []
    for _ in range(2):
        with pytest.raises(DeliveryError) as info:
            sink.write(batch)
        reasons.append(info.value.reason)
    sink.write(batch)
    assert reasons == ["http_500", "timeout"]
    assert [s.connection for s in receiver.seen] == [1, 1, 2]
    assert [json.loads(b) for b in receiver.bodies()] == [records] * 3
    assert (sink.requests, sink.sent, sink.failures, sink.last_status) == (3, 2, 2, 200)


def test_one_kept_alive_connection_carries_many_batches(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """Batches share one TCP connection (keep-alive)."""
    sink = make_sink(receiver.url())
    for n in range(5):
        sink.write(lines_of([alert(n)]))
    assert [s.connection for s in receiver.seen] == [1] * 5
    assert receiver.connections == 1


def test_a_connection_the_server_closed_while_idle_is_reopened_without_failing(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """A kept-alive connection the server dropped between batches fails the next request;
    the sink sends it again at once on a new connection instead of failing the batch."""
    receiver.script(Reply(200, drop=True))
    sink = make_sink(receiver.url())
    sink.write(lines_of([alert(1)]))
    sink.write(lines_of([alert(2)]))
    assert [s.connection for s in receiver.seen] == [1, 2]
    assert (sink.sent, sink.failures) == (2, 0)
    assert sink.requests == 3  # the attempt on the dead connection counts


def test_a_connection_the_server_closes_after_connection_close_is_reopened(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """An answer with `Connection: close` ends the connection; the next batch opens one."""
    receiver.script(Reply(200, headers={"Connection": "close"}))
    sink = make_sink(receiver.url())
    sink.write(lines_of([alert(1)]))
    sink.write(lines_of([alert(2)]))
    assert [s.connection for s in receiver.seen] == [1, 2]
    assert sink.requests == 2


def test_a_redirect_is_a_failure_and_is_not_followed(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """A 3xx is a failure (reason http_<status>), naming only the target's scheme and host:
    following it could hand the batch and the credential to another server."""
    location = "https://elsewhere.example:8443/in?token=qs-secret-123"
    receiver.default = Reply(301, b"", headers={"Location": location})
    sink = make_sink(receiver.url(), token=TOKEN)
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    assert info.value.reason == "http_301"
    assert "https://elsewhere.example:8443" in str(info.value)
    assert "qs-secret-123" not in str(info.value)
    assert len(receiver.seen) == 1


def test_connection_refused(make_sink: Callable[..., HttpSink]) -> None:
    """Nobody listening: reason connection_refused."""
    with socket.socket() as reserved:  # bound, not listening: the port refuses
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        sink = make_sink(f"http://127.0.0.1:{port}/")
        with pytest.raises(DeliveryError) as info:
            sink.write(lines_of([alert(1)]))
    assert info.value.reason == "connection_refused"
    assert sink.requests == 1


def test_an_unknown_host_is_a_dns_error(make_sink: Callable[..., HttpSink]) -> None:
    """A name that does not resolve: reason dns_error."""
    host = "exfilwatch-sink-test.invalid"  # RFC 6761: never resolves
    try:
        socket.getaddrinfo(host, 80)
    except socket.gaierror:
        pass
    else:
        pytest.skip("this resolver answers for .invalid names")
    sink = make_sink(f"http://{host}/")
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    assert info.value.reason == "dns_error"


def test_constructing_a_sink_does_not_connect(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """The constructor opens no connection (the agent may start before its SIEM); an empty
    batch sends nothing either."""
    sink = make_sink(receiver.url())
    sink.write([])
    sink.close()
    assert receiver.connections == 0
    assert sink.requests == 0


def test_close_ends_a_write_blocked_on_a_hang(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """close() from another thread ends a write waiting on a silent server at once (the
    router stopping need not wait out the time-out), and the sink refuses later writes."""
    receiver.default = Reply(hang=True)
    sink = make_sink(receiver.url(), timeout=60)
    outcome: list[BaseException] = []

    def write() -> None:
        try:
            sink.write(lines_of([alert(1)]))
        except BaseException as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write, name="test-writer")
    started = time.monotonic()
    writer.start()
    assert receiver.request_seen.wait(20)
    sink.close()
    writer.join(20)
    assert not writer.is_alive()
    assert time.monotonic() - started < 20
    [error] = outcome
    assert isinstance(error, DeliveryError)
    assert error.reason == "sink_closed"
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(2)]))
    assert info.value.reason == "sink_closed"


# Credentials -----------------------------------------------------------------------------------


def echo_request(seen: Seen) -> bytes:
    """A server that quotes the request back in its error, credentials first."""
    quoted = [seen.headers.get("authorization", ""), seen.headers.get("x-api-key", ""), seen.path]
    return ("denied: " + " ".join(quoted)).encode()


@pytest.mark.parametrize(
    ("format", "auth"),
    [
        ("json", {"token": TOKEN}),
        ("json", {"username": "svc", "password": PASSWORD}),
        ("hec", {"token": TOKEN}),
        ("bulk", {"token": TOKEN}),
        ("bulk", {"username": "svc", "password": PASSWORD}),
        ("json", {"headers": {"X-Api-Key": TOKEN}}),
    ],
)
def test_credentials_never_appear_in_the_name_or_an_error(
    receiver: Receiver,
    make_sink: Callable[..., HttpSink],
    format: str,
    auth: dict[str, Any],
) -> None:
    """The credential reaches the server, but not `name`, repr(), or an error message, even
    from a server that echoes the request; the name keeps no query string either."""
    receiver.default = Reply(401, echo_request)
    sink = make_sink(receiver.url("/in?auth=qs-secret-456"), format, **auth)
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    assert info.value.reason == "http_401"
    assert "[redacted]" in str(info.value)  # the echo was quoted, without the secret
    sent_header = json.dumps(receiver.seen[0].headers)
    secrets = [TOKEN, PASSWORD, base64.b64encode(f"svc:{PASSWORD}".encode()).decode()]
    assert any(s in sent_header for s in secrets)
    shown = " ".join([sink.name, repr(sink), str(info.value), repr(info.value), info.value.reason])
    for secret in [*secrets, "qs-secret-456"]:
        assert secret not in shown
    assert sink.name == f"http:http://127.0.0.1:{receiver.port}/in"


@pytest.mark.parametrize(
    ("args", "kw"),
    [
        (("ftp://host/x",), {}),
        (("http://user:pw-in-url-77@host/x",), {}),
        (("http:///x",), {}),
        (("http://host:99999/x",), {}),
        (("http://host/x", "xml"), {}),
        (("http://host/x", "hec"), {}),  # hec needs a token
        (("http://host/x",), {"token": TOKEN, "username": "u", "password": PASSWORD}),
        (("http://host/x",), {"username": "u"}),
        (("http://host/x",), {"token": TOKEN + "\r\nX-Evil: 1"}),
        (("http://host/x",), {"username": "a:b", "password": PASSWORD}),
        (("http://host/x",), {"headers": {"Content-Length": "1"}}),
        (("http://host/x",), {"headers": {"X-Ok": "a\r\nX-Evil: 1"}}),
        (("http://host/x",), {"headers": {"Bad Name": "1"}}),
        (("http://host/x",), {"token": TOKEN, "headers": {"Authorization": "x"}}),
        (("http://host/x",), {"ca_file": "/etc/ssl/certs/ca-certificates.crt"}),
        (("http://host/x",), {"timeout": 0}),
        (("http://host/x",), {"max_batch_bytes": 0}),
    ],
)
def test_a_bad_configuration_is_refused_at_construction(
    args: tuple[str, ...], kw: dict[str, Any]
) -> None:
    """Configuration mistakes are ValueErrors when the sink is made, not failures on every
    batch, and the message never repeats a credential."""
    with pytest.raises(ValueError) as info:
        HttpSink(*args, **kw)
    for secret in (TOKEN, PASSWORD, "pw-in-url-77"):
        assert secret not in str(info.value)


# Size limits -----------------------------------------------------------------------------------


def format_reply(format: str) -> Reply:
    if format == "bulk":
        return Reply(200, FakeElastic())
    if format == "hec":
        return Reply(200, b'{"text":"Success","code":0}')
    return Reply(200)


@pytest.mark.parametrize("format", ["json", "hec", "bulk"])
def test_a_batch_over_max_batch_bytes_goes_as_several_requests(
    receiver: Receiver, make_sink: Callable[..., HttpSink], format: str
) -> None:
    """Each request body stays within max_batch_bytes and is complete in itself; together
    they carry every record once, in order."""
    receiver.default = format_reply(format)
    records = [alert(n, path=f"/srv/rnd/{'x' * 100}/{n}") for n in range(1, 11)]
    limit = 3 * len(dumps(records[0])) + 400
    sink = make_sink(receiver.url(), format, token=TOKEN, max_batch_bytes=limit)
    sink.write(lines_of(records))
    bodies = receiver.bodies()
    assert 3 <= len(bodies) <= 10
    assert all(len(b) <= limit for b in bodies)
    assert [r for b in bodies for r in received(format, b)] == records
    assert (sink.requests, sink.sent) == (len(bodies), 10)


def test_a_record_larger_than_max_batch_bytes_goes_alone(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """A record that alone exceeds the limit is still sent, in a request of its own."""
    records = [alert(1), alert(2, path="/" + "y" * 2000), alert(3)]
    sink = make_sink(receiver.url(), max_batch_bytes=1000)
    sink.write(lines_of(records))
    assert [received("json", b) for b in receiver.bodies()] == [[r] for r in records]


def test_a_failing_part_fails_the_whole_write(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """If request 2 of 3 fails, write raises and sends no more; the router's resend of the
    whole batch then delivers everything (the first part twice)."""
    receiver.script(Reply(200), Reply(503, b"busy"))
    records = [alert(n) for n in range(1, 7)]
    sink = make_sink(receiver.url(), max_batch_bytes=2 * len(dumps(records[0])) + 10)
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of(records))
    assert info.value.reason == "http_503"
    assert len(receiver.seen) == 2
    assert sink.sent == 2
    sink.write(lines_of(records))
    delivered = [r for b in receiver.bodies()[2:] for r in received("json", b)]
    assert delivered == records


# TLS ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=exfilwatch test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    (d / "srv.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "srv.ext",
    )  # fmt: skip
    return Pki(d / "ca.pem", d / "srv.pem", d / "srv.key")


@pytest.fixture
def tls_receiver(pki: Pki, serve: Callable[..., Receiver]) -> Receiver:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    return serve(tls=context)


def test_https_with_the_right_ca_file_delivers(
    tls_receiver: Receiver, pki: Pki, make_sink: Callable[..., HttpSink]
) -> None:
    """https verifies the server against ca_file (by IP address and by name)."""
    for host in ("127.0.0.1", "localhost"):
        sink = make_sink(tls_receiver.url(host=host), ca_file=str(pki.ca))
        sink.write(lines_of([alert(1)]))
        assert sink.sent == 1
    assert len(tls_receiver.seen) == 2


def test_https_against_the_default_trust_store_is_a_tls_error(
    tls_receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """Verification is on by default: a certificate from an unknown CA fails with
    tls_error, and no batch reaches the server."""
    sink = make_sink(tls_receiver.url())
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    assert info.value.reason == "tls_error"
    assert "certificate" in str(info.value).lower()
    assert tls_receiver.seen == []


def test_https_with_verify_off_accepts_any_certificate(
    tls_receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """verify=False (unsafe, for a first test only) skips the certificate check."""
    sink = make_sink(tls_receiver.url(), verify=False)
    sink.write(lines_of([alert(1)]))
    assert json.loads(tls_receiver.seen[0].body) == [alert(1)]


def test_https_to_a_plain_http_server_is_a_tls_error(
    receiver: Receiver, make_sink: Callable[..., HttpSink]
) -> None:
    """https:// to a port that speaks plain HTTP fails as tls_error."""
    sink = make_sink(receiver.url().replace("http://", "https://"), timeout=5)
    with pytest.raises(DeliveryError) as info:
        sink.write(lines_of([alert(1)]))
    assert info.value.reason == "tls_error"


# Hostile content ---------------------------------------------------------------------------------


HOSTILE_PATHS = [
    "/srv/rnd/line1\nline2.step",
    "/srv/rnd/\x1b[31mred\x1b[0m\x1b]0;title\x07.dwg",
    "/srv/rnd/" + os.fsdecode(b"bad-\xff\xfe-utf8.bin"),
    '/srv/rnd/quote"brace}{bracket]\\.txt',
    "/srv/rnd/\u202eexe.pdf",
    '/srv/rnd/fake\n{"event":{"kind":"alert","id":"forged"}}',
]


@pytest.mark.parametrize("format", ["json", "hec", "bulk"])
def test_hostile_file_names_arrive_as_exactly_one_record_each(
    receiver: Receiver, make_sink: Callable[..., HttpSink], format: str
) -> None:
    """Newlines, ANSI escapes, invalid UTF-8 and forged JSON in file.path: each alert
    arrives as exactly one record, equal to the original."""
    elastic = FakeElastic()
    receiver.default = format_reply(format) if format != "bulk" else Reply(200, elastic)
    records = [alert(n, path=p) for n, p in enumerate(HOSTILE_PATHS, start=1)]
    lines = lines_of(records)
    assert all(line.isascii() and "\n" not in line for line in lines)
    sink = make_sink(receiver.url(), format, token=TOKEN)
    sink.write(lines)
    [body] = receiver.bodies()
    assert body.isascii()
    assert received(format, body) == records
    if format == "bulk":
        assert len(elastic.docs) == len(records)
