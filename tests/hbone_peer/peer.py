#!/usr/bin/env python3
"""An independent HBONE peer: HTTP/2 CONNECT over mutual TLS 1.3, as Istio's ztunnel speaks it.

Four modes (run with --help for details):

  client  connects to an HBONE server, checks its TLS identity and HTTP/2 SETTINGS, then runs
          the requests listed in a JSON spec file and prints one JSON report on stdout.
  server  accepts HBONE connections the way Istio's ztunnel does and, for every accepted
          CONNECT stream, plays the application: it reads the stream to its end, hashes the
          bytes and answers with one JSON line. With --goaway-after N it retires each
          connection once it has replied to N streams, as a draining or ageing server does:
          GOAWAY (NO_ERROR) naming the last stream received, REFUSED_STREAM for later ones,
          closed once the named ones are done.
  waypoint  plays an Istio waypoint as far as L4 goes: accepts HBONE connections like the
          server mode, and relays each accepted CONNECT stream over a new HBONE connection of
          its own to the workload its authority routes to (--route), both ways, passing on
          END_STREAM and RST_STREAM; prints one JSON line per stream.
  gateway plays an Istio east-west gateway: accepts HBONE connections like the server mode
          and relays each accepted CONNECT stream over a plain TCP connection to its
          authority, bytes unchanged (double HBONE: the inner connection passes through);
          prints one JSON line when it starts relaying a stream and one when it ends.

It shares no code with the project's Rust proxy, so the end-to-end tests can hold the proxy
against a second, separately written implementation of the same contract.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import queue
import re
import secrets
import selectors
import socket
import ssl
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    from h2.config import H2Configuration
    from h2.connection import ConnectionState, H2Connection
    from h2.errors import ErrorCodes
    from h2.events import (
        ConnectionTerminated,
        DataReceived,
        Event,
        RemoteSettingsChanged,
        RequestReceived,
        ResponseReceived,
        StreamEnded,
        StreamReset,
    )
    from h2.exceptions import H2Error, ProtocolError
    from h2.settings import SettingCodes, Settings
    from hyperframe.frame import GoAwayFrame
except ImportError:
    sys.exit(
        "peer.py: error: the Python package h2 (>=4,<5) is missing: "
        "run `cargo xtask setup` or `python3 -m pip install 'h2>=4,<5'`"
    )

# HTTP/2 settings of a ztunnel HBONE server (and of its client).
INITIAL_WINDOW_SIZE = 4 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
MAX_CONCURRENT_STREAMS = 200
CONNECTION_WINDOW = 16 * 1024 * 1024
# The window every HTTP/2 connection starts with (RFC 9113, section 6.9.2).
DEFAULT_CONNECTION_WINDOW = 65_535

# The first SETTINGS frame of each side of a ztunnel HBONE connection.
CLIENT_SETTINGS = {
    SettingCodes.ENABLE_PUSH: 0,
    SettingCodes.INITIAL_WINDOW_SIZE: INITIAL_WINDOW_SIZE,
    SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
}
SERVER_SETTINGS = {
    SettingCodes.INITIAL_WINDOW_SIZE: INITIAL_WINDOW_SIZE,
    SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
    SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
}

# Ports of ztunnel itself: a CONNECT to one of them is answered 503.
PROXY_PORTS = frozenset({15000, 15001, 15006, 15008, 15020, 15021, 15053})

READ_SIZE = 256 * 1024
# How much of a response body the client keeps (it counts the rest).
KEPT_BODY = 64 * 1024

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
BAGGAGE_KEY = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class PeerError(Exception):
    """An expected failure (network, TLS, protocol, timeout): reported as one clear message."""


class UsageError(PeerError):
    """Bad command-line input or input file: exit status 2."""


# ---------------------------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------------------------


def parse_host_port(text: str, allow_port_zero: bool = False) -> tuple[str, int | None]:
    """Splits "1.2.3.4:80", "[::1]:80", "1.2.3.4" or "::1" into (ip, port or None).

    Raises ValueError unless the host is an IP address and the port, if any, is 1-65535
    (or 0, with allow_port_zero).
    """
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text)), None
    except ValueError:
        pass
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{text!r}: unclosed '['")
        if not rest:
            return str(ipaddress.IPv6Address(host)), None
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':' after ']'")
        port_text = rest[1:]
        ip = str(ipaddress.IPv6Address(host))
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} is not an IP address")
        ip = str(ipaddress.IPv4Address(host))
    lowest = 0 if allow_port_zero else 1
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise ValueError(f"{text!r}: bad port {port_text!r}")
    return ip, int(port_text)


def format_address(ip: str, port: int) -> str:
    """The "ip:port" form, with IPv6 addresses in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def socket_address(address: tuple[Any, ...]) -> str:
    """The "ip:port" form of a socket address tuple."""
    return format_address(str(address[0]), int(address[1]))


def address_argument(allow_port_zero: bool) -> Callable[[str], tuple[str, int]]:
    """An argparse type for IP:PORT options."""

    def parse(text: str) -> tuple[str, int]:
        try:
            ip, port = parse_host_port(text, allow_port_zero)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if port is None:
            raise argparse.ArgumentTypeError(f"{text!r} has no port (expected IP:PORT)")
        return ip, port

    return parse


def plain_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address, with IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) as IPv4."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_port(text: str) -> int:
    """argparse type for a TCP port, 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def positive_int(text: str) -> int:
    """argparse type for a count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def positive_float(text: str) -> float:
    """argparse type for a timeout in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


# ---------------------------------------------------------------------------------------------
# TLS and identities
# ---------------------------------------------------------------------------------------------


def tls_context(purpose: str, ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.3-only, ALPN h2, mutually authenticated context; purpose is "client" or "server".

    Names are checked as SPIFFE URI SANs by the caller, never as DNS names or IPs.
    """
    protocol = ssl.PROTOCOL_TLS_CLIENT if purpose == "client" else ssl.PROTOCOL_TLS_SERVER
    context = ssl.SSLContext(protocol)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as error:
        raise UsageError(f"cannot load the root CA {ca}: {error}") from None
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as error:
        raise UsageError(f"cannot load the certificate {cert} with key {key}: {error}") from None
    return context


def uri_sans(peer_certificate: dict[str, Any] | None) -> list[str]:
    """The URI subject alternative names of a verified peer certificate."""
    if not peer_certificate:
        return []
    return [value for kind, value in peer_certificate.get("subjectAltName", ()) if kind == "URI"]


def spiffe_trust_domain(uri: str) -> str | None:
    """The trust domain of a "spiffe://<trust-domain>/ns/<ns>/sa/<sa>" identity, else None."""
    match = re.fullmatch(r"spiffe://([^/]+)/ns/[^/]+/sa/[^/]+", uri)
    return match.group(1) if match else None


def describe_os_error(error: OSError) -> str:
    """A one-line description of a socket or TLS error."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return error.strerror or str(error) or type(error).__name__


# ---------------------------------------------------------------------------------------------
# HTTP/2
# ---------------------------------------------------------------------------------------------


def new_h2_connection(client_side: bool, settings: dict[SettingCodes, int]) -> H2Connection:
    """An h2 connection whose first SETTINGS frame carries `settings` and whose connection
    window is raised to CONNECTION_WINDOW by a WINDOW_UPDATE right after it."""
    connection = H2Connection(H2Configuration(client_side=client_side, header_encoding="utf-8"))
    # Replacing the settings before the preface puts them in the first SETTINGS frame (instead
    # of a second one), as ztunnel does; h2 then needs to be told the frame size it accepts.
    connection.local_settings = Settings(client=client_side, initial_values=settings)
    connection.max_inbound_frame_size = connection.local_settings.max_frame_size
    connection.initiate_connection()
    connection.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_CONNECTION_WINDOW)
    return connection


def setting_name(code: int) -> str:
    """"initial_window_size" for SETTINGS_INITIAL_WINDOW_SIZE; hex for unknown settings."""
    try:
        return SettingCodes(code).name.lower()
    except ValueError:
        return f"0x{code:x}"


class PatternBytes:
    """Deterministic pseudo-random bytes: SHAKE-256 of a seed and a block counter."""

    BLOCK = 64 * 1024

    def __init__(self, seed: str) -> None:
        self._seed = hashlib.sha256(seed.encode()).digest()
        self._counter = 0
        self._buffer = b""

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            block = hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big"))
            self._buffer += block.digest(self.BLOCK)
            self._counter += 1
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


# ---------------------------------------------------------------------------------------------
# Client mode
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One request of a spec file."""

    name: str
    method: str
    authority: str
    expect_status: int
    send: int | None
    expect_reply_json: bool
    # Header overrides: a string sets the header, None leaves a default header out.
    headers: dict[str, str | None]


SPEC_KEYS = {"name", "method", "authority", "expect_status", "send", "expect_reply_json", "headers"}


def load_spec(path: str) -> list[Check]:
    """Reads and validates a spec file (a JSON list of check objects)."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except OSError as error:
        raise UsageError(f"cannot read the spec {path}: {describe_os_error(error)}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"the spec {path} is not valid JSON: {error}") from None
    if not isinstance(entries, list):
        raise UsageError(f"the spec {path} must be a JSON list of checks")
    checks = []
    for index, entry in enumerate(entries):
        where = f"spec {path}, check #{index + 1}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: must be a JSON object")
        unknown = set(entry) - SPEC_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
        name = entry.get("name")
        method = entry.get("method", "CONNECT")
        authority = entry.get("authority")
        status = entry.get("expect_status")
        send = entry.get("send")
        reply_json = entry.get("expect_reply_json", False)
        headers = entry.get("headers", {})
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: 'name' must be a non-empty string")
        if method not in ("CONNECT", "GET"):
            raise UsageError(f"{where}: 'method' must be \"CONNECT\" or \"GET\"")
        if not isinstance(authority, str) or not authority:
            raise UsageError(f"{where}: 'authority' must be a string like \"10.0.0.1:8080\"")
        if type(status) is not int or not 100 <= status <= 599:
            raise UsageError(f"{where}: 'expect_status' must be an HTTP status like 200")
        if send is not None and (type(send) is not int or send < 0):
            raise UsageError(f"{where}: 'send' must be a number of bytes (0 or more)")
        if not isinstance(reply_json, bool):
            raise UsageError(f"{where}: 'expect_reply_json' must be true or false")
        if reply_json and send is None:
            raise UsageError(f"{where}: 'expect_reply_json' needs 'send'")
        if not isinstance(headers, dict) or not all(
            isinstance(key, str) and (value is None or isinstance(value, str))
            for key, value in headers.items()
        ):
            raise UsageError(f"{where}: 'headers' must map names to strings or null")
        lowered = {key.lower(): value for key, value in headers.items()}
        checks.append(Check(name, method, authority, status, send, reply_json, lowered))
    return checks


@dataclass
class ResponseState:
    """What the client has seen of one stream."""

    stream_id: int
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    body_length: int = 0
    ended: bool = False
    reset_code: int | None = None

    @property
    def finished(self) -> bool:
        return self.ended or self.reset_code is not None


class ClientSession:
    """An HTTP/2 client connection over an established TLS socket, driven in one thread."""

    def __init__(self, tls: ssl.SSLSocket, timeout: float) -> None:
        self.goaway: str | None = None
        self.tls = tls
        self.timeout = timeout
        self.connection = new_h2_connection(client_side=True, settings=CLIENT_SETTINGS)
        self.responses: dict[int, ResponseState] = {}
        # The parameters of the server's first SETTINGS frame, once received.
        self.server_settings: dict[str, int] | None = None
        # Why the connection is over, once it is.
        self.closed: str | None = None
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if not data:
            return
        self.tls.settimeout(self.timeout)
        try:
            self.tls.sendall(data)
        except OSError as error:
            self.closed = f"sending failed: {describe_os_error(error)}"
            raise PeerError(self.closed) from None

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Processes incoming frames until condition() holds; at most `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        while not condition():
            if self.closed:
                raise PeerError(f"waiting for {what}: the connection is closed ({self.closed})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"timed out after {self.timeout:g} s waiting for {what}")
            self.tls.settimeout(remaining)
            try:
                data = self.tls.recv(READ_SIZE)
            except TimeoutError:
                continue
            except OSError as error:
                self.closed = describe_os_error(error)
                continue
            if not data:
                self.closed = "the server closed it"
                continue
            try:
                events = self.connection.receive_data(data)
            except ProtocolError as error:
                # python-h2 closes the connection on receiving GOAWAY and then rejects frames
                # a server may legitimately still send (the PING of a graceful shutdown), losing
                # the GOAWAY event with them. A closed state we did not cause means GOAWAY came.
                if self.goaway is None and self.connection.state_machine.state == ConnectionState.CLOSED:
                    self.goaway = "received (followed by a frame python-h2 rejects after GOAWAY)"
                self.closed = f"HTTP/2 protocol error from the server: {error}"
                self.flush_quietly()
                continue
            for event in events:
                self.handle(event)
            self.flush()

    def flush_quietly(self) -> None:
        try:
            self.flush()
        except PeerError:
            pass

    def handle(self, event: Event) -> None:
        state = self.responses.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, RemoteSettingsChanged):
            if self.server_settings is None:
                self.server_settings = {
                    setting_name(code): change.new_value
                    for code, change in event.changed_settings.items()
                }
        elif isinstance(event, ResponseReceived) and state is not None:
            status = dict(event.headers).get(":status", "")
            state.status = int(status) if status.isdigit() else -1
        elif isinstance(event, DataReceived):
            self.connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            if state is not None:
                room = KEPT_BODY - len(state.body)
                state.body += event.data[: max(room, 0)]
                state.body_length += len(event.data)
        elif isinstance(event, StreamEnded) and state is not None:
            state.ended = True
        elif isinstance(event, StreamReset) and state is not None:
            state.reset_code = int(event.error_code)
        elif isinstance(event, ConnectionTerminated):
            self.goaway = ErrorCodes(event.error_code).name
            self.closed = f"the server sent GOAWAY ({self.goaway})"

    def handshake(self) -> dict[str, int]:
        """Waits for the server's SETTINGS, then briefly for the connection-window update
        that follows them; returns the parameters of that SETTINGS frame."""
        self.wait_for(lambda: self.server_settings is not None, "the server's SETTINGS frame")
        saved, self.timeout = self.timeout, min(self.timeout, 1.0)
        try:
            self.wait_for(
                lambda: self.connection.outbound_flow_control_window >= CONNECTION_WINDOW,
                "the connection WINDOW_UPDATE",
            )
        except PeerError:
            pass  # The settings check reports the window it got.
        finally:
            self.timeout = saved
        assert self.server_settings is not None
        return dict(self.server_settings)

    def open_stream(self, headers: list[tuple[str, str]]) -> ResponseState:
        stream_id = self.connection.get_next_available_stream_id()
        self.connection.send_headers(stream_id, headers)
        state = ResponseState(stream_id)
        self.responses[stream_id] = state
        self.flush()
        return state

    def send_body(self, state: ResponseState, size: int, source: PatternBytes) -> str:
        """Sends `size` bytes within the flow-control windows, then END_STREAM; returns SHA-256."""
        stream_id = state.stream_id
        digest = hashlib.sha256()
        remaining = size
        while remaining:
            window = self.send_window(stream_id)
            if window <= 0:
                self.wait_for(
                    lambda: state.reset_code is not None or self.send_window(stream_id) > 0,
                    "the server to open the flow-control window",
                )
            if state.reset_code is not None:
                raise PeerError(
                    f"the server reset the stream ({ErrorCodes(state.reset_code).name}) "
                    f"after {size - remaining} of {size} bytes"
                )
            chunk = min(self.send_window(stream_id), self.connection.max_outbound_frame_size)
            data = source.read(min(chunk, remaining))
            digest.update(data)
            self.connection.send_data(stream_id, data)
            self.flush()
            remaining -= len(data)
        self.connection.end_stream(stream_id)
        self.flush()
        return digest.hexdigest()

    def send_window(self, stream_id: int) -> int:
        try:
            return self.connection.local_flow_control_window(stream_id)
        except H2Error:
            return 0

    def cancel(self, state: ResponseState) -> None:
        """Resets a stream that is still open; quietly does nothing otherwise."""
        if self.closed:
            return
        try:
            self.connection.reset_stream(state.stream_id, ErrorCodes.CANCEL)
            self.flush()
        except (H2Error, PeerError):
            pass


def request_headers(check: Check, forwarded_for: str) -> list[tuple[str, str]]:
    """The request of a check: pseudo-headers first, then ztunnel's headers and overrides."""
    if check.method == "CONNECT":
        headers = [(":method", "CONNECT"), (":authority", check.authority)]
    else:
        headers = [
            (":method", check.method),
            (":scheme", "https"),
            (":authority", check.authority),
            (":path", "/"),
        ]
    defaults = {
        "forwarded": f'for="{forwarded_for}"',
        "baggage": "k8s.cluster.name=Kubernetes,service.name=hbone-peer,service.version=v1",
        "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
    }
    merged = {**defaults, **check.headers}
    headers += [(name, value) for name, value in merged.items() if value is not None]
    return headers


def check_result(name: str, ok: bool, detail: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, **extra}


def run_check(session: ClientSession, check: Check, forwarded_for: str) -> dict[str, Any]:
    """Runs one check of the spec on its own stream."""
    state = session.open_stream(request_headers(check, forwarded_for))
    session.wait_for(lambda: state.status is not None or state.finished, "the response headers")
    if state.status is None:
        code = ErrorCodes(state.reset_code).name if state.reset_code is not None else "?"
        return check_result(check.name, False, f"the server reset the stream ({code}) "
                            "before sending a response")
    status = state.status
    if status != check.expect_status:
        session.cancel(state)
        return check_result(check.name, False, f"status {status}, expected "
                            f"{check.expect_status}", status=status)
    if status != 200 or check.send is None:
        session.cancel(state)
        return check_result(check.name, True, f"status {status}", status=status)

    digest = session.send_body(state, check.send, PatternBytes(check.name))
    session.wait_for(lambda: state.finished, "the end of the response body")
    sent = f"sent {check.send} bytes (sha256 {digest})"
    if state.reset_code is not None:
        return check_result(check.name, False, f"status 200, {sent}, then the server reset the "
                            f"stream ({ErrorCodes(state.reset_code).name})", status=status)
    detail = f"status 200, {sent}, received {state.body_length} bytes"
    if not check.expect_reply_json:
        return check_result(check.name, True, detail, status=status)

    first_line = bytes(state.body).split(b"\n", 1)[0]
    try:
        reply = json.loads(first_line)
    except ValueError:
        return check_result(check.name, False, f"{detail}; the first line is not JSON: "
                            f"{first_line[:200]!r}", status=status)
    if not isinstance(reply, dict):
        return check_result(check.name, False, f"{detail}; the reply is not a JSON object",
                            status=status)
    problems = []
    if reply.get("bytes") != check.send:
        problems.append(f"reply says {reply.get('bytes')!r} bytes")
    if reply.get("sha256") != digest:
        problems.append(f"reply says sha256 {reply.get('sha256')!r}")
    if problems:
        return check_result(check.name, False, f"{detail}; " + ", ".join(problems),
                            status=status, reply=reply)
    return check_result(check.name, True, f"{detail}; the reply matches", status=status,
                        reply=reply)


def settings_check(settings: dict[str, int], connection_window: int) -> dict[str, Any]:
    """Compares the server's SETTINGS and connection window with ztunnel's."""
    expected = {
        "initial_window_size": INITIAL_WINDOW_SIZE,
        "max_frame_size": MAX_FRAME_SIZE,
        "max_concurrent_streams": MAX_CONCURRENT_STREAMS,
    }
    problems = [
        f"{name} is {settings.get(name, 'not sent')}, expected {value}"
        for name, value in expected.items()
        if settings.get(name) != value
    ]
    if connection_window < CONNECTION_WINDOW:
        problems.append(f"connection window is {connection_window}, expected {CONNECTION_WINDOW}")
    if problems:
        return check_result("server_settings", False, "; ".join(problems))
    return check_result(
        "server_settings",
        True,
        "initial_window_size 4194304, max_frame_size 1048576, max_concurrent_streams 200, "
        f"connection window {connection_window}",
    )


def await_goaway(session: "ClientSession", seconds: float) -> dict[str, Any]:
    """Keeps the connection open until the server sends GOAWAY (as it must on shutdown)."""
    print("awaiting GOAWAY", file=sys.stderr, flush=True)
    saved, session.timeout = session.timeout, seconds
    try:
        session.wait_for(lambda: session.goaway is not None or bool(session.closed), "a GOAWAY")
    except PeerError as error:
        return check_result("goaway", False, str(error))
    finally:
        session.timeout = saved
    if session.goaway is None:
        return check_result("goaway", False, f"the connection ended without GOAWAY ({session.closed})")
    return check_result("goaway", True, f"GOAWAY with {session.goaway}")


def run_client(args: argparse.Namespace) -> int:
    checks = load_spec(args.check)
    context = tls_context("client", args.ca, args.cert, args.key)
    report: dict[str, Any] = {
        "server_identity": None,
        "alpn": None,
        "tls_version": None,
        "settings": {},
        "checks": [],
        "ok": False,
    }
    try:
        run_client_session(args, context, checks, report)
    except PeerError as error:
        report["error"] = str(error)
        print(f"peer.py client: {error}", file=sys.stderr)
    report["ok"] = "error" not in report and all(c["ok"] for c in report["checks"])
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def run_client_session(
    args: argparse.Namespace,
    context: ssl.SSLContext,
    checks: list[Check],
    report: dict[str, Any],
) -> None:
    """Connects, checks the TLS session, then runs the checks, filling `report` as it goes."""
    ip, port = args.connect
    target = format_address(ip, port)
    try:
        raw = socket.create_connection((ip, port), timeout=args.timeout)
    except OSError as error:
        raise PeerError(f"cannot connect to {target}: {describe_os_error(error)}") from None
    try:
        try:
            tls = context.wrap_socket(raw, server_hostname=None)
        except OSError as error:
            raise PeerError(f"TLS handshake with {target} failed: "
                            f"{describe_os_error(error)}") from None
        with tls:
            run_over_tls(args, tls, checks, report)
    finally:
        raw.close()


def run_over_tls(
    args: argparse.Namespace,
    tls: ssl.SSLSocket,
    checks: list[Check],
    report: dict[str, Any],
) -> None:
    identities = uri_sans(tls.getpeercert())
    report["server_identity"] = identities[0] if len(identities) == 1 else identities
    report["alpn"] = tls.selected_alpn_protocol()
    report["tls_version"] = tls.version()
    if report["alpn"] != "h2":
        raise PeerError(f"the server selected ALPN {report['alpn']!r}, not 'h2'")
    if args.expect_identity not in identities:
        raise PeerError(f"the server's identity is {identities or 'missing'}, "
                        f"expected {args.expect_identity}")

    session = ClientSession(tls, args.timeout)
    report["settings"] = session.handshake()
    report["settings"]["connection_window"] = session.connection.outbound_flow_control_window
    forwarded_for = socket_address(tls.getsockname())
    for check in checks:
        if session.closed:
            report["checks"].append(check_result(
                check.name, False, f"not run: the connection is closed ({session.closed})"))
            continue
        try:
            report["checks"].append(run_check(session, check, forwarded_for))
        except PeerError as error:
            report["checks"].append(check_result(check.name, False, str(error)))
    report["checks"].append(
        settings_check(report["settings"], report["settings"]["connection_window"])
    )
    if args.await_goaway is not None:
        report["checks"].append(await_goaway(session, args.await_goaway))
    if not session.closed:
        session.connection.close_connection()
        session.flush_quietly()


# ---------------------------------------------------------------------------------------------
# Server mode
# ---------------------------------------------------------------------------------------------


class Output:
    """Line-at-a-time output shared by the connection threads; `mode` prefixes errors."""

    def __init__(self, mode: str = "server") -> None:
        self._lock = threading.Lock()
        self._prefix = f"peer.py {mode}: "

    def line(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        self.line(json.dumps(record))

    def error(self, text: str) -> None:
        with self._lock:
            print(f"{self._prefix}{text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: str
    deny_ports: frozenset[int]
    timeout: float
    # Retire each connection with GOAWAY once it has replied to this many streams.
    goaway_after: int | None = None


def forwarded_for(value: str) -> str | None:
    """The "ip:port" of the first `for=` of a Forwarded header (RFC 7239), if well-formed."""
    for element in value.split(","):
        for pair in element.split(";"):
            key, equals, found = pair.strip().partition("=")
            if not equals or key.strip().lower() != "for":
                continue
            found = found.strip()
            if len(found) >= 2 and found[0] == found[-1] == '"':
                found = found[1:-1]
            try:
                ip, port = parse_host_port(found)
            except ValueError:
                return None
            return format_address(ip, port) if port is not None else None
    return None


def header_problem(headers: dict[str, str]) -> str | None:
    """Why ztunnel's `forwarded`, `baggage` and `traceparent` headers are not right, if so."""
    for name in ("forwarded", "baggage", "traceparent"):
        if name not in headers:
            return f"missing header {name!r}"
    if forwarded_for(headers["forwarded"]) is None:
        return f"forwarded {headers['forwarded']!r} has no for=\"ip:port\""
    members = [member.strip() for member in headers["baggage"].split(",")]
    for member in members:
        key, equals, _ = member.split(";", 1)[0].partition("=")
        if not equals or not BAGGAGE_KEY.match(key.strip()):
            return f"baggage {headers['baggage']!r} has a member that is not key=value"
    match = TRACEPARENT.match(headers["traceparent"])
    if not match:
        return f"traceparent {headers['traceparent']!r} is not 00-<32 hex>-<16 hex>-<2 hex>"
    if set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return f"traceparent {headers['traceparent']!r} has an all-zero id"
    return None


def split_headers(header_list: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """(pseudo-headers, other headers) of a request; repeated headers are joined with commas."""
    pseudo = {name: value for name, value in header_list if name.startswith(":")}
    headers: dict[str, str] = {}
    for name, value in header_list:
        if not name.startswith(":"):
            headers[name] = f"{headers[name]},{value}" if name in headers else value
    return pseudo, headers


def decide(method: str, authority: str, headers: dict[str, str], local_ip: str,
           config: ServerConfig) -> tuple[int, str]:
    """The status ztunnel answers a request with, and why."""
    if method != "CONNECT":
        return 400, f"method {method} is not CONNECT"
    try:
        ip, port = parse_host_port(authority)
    except ValueError as error:
        return 400, f"bad authority: {error}"
    if port is None:
        return 400, f"authority {authority!r} has no port"
    if plain_ip(ip) != plain_ip(local_ip):
        return 400, f"authority IP {ip} is not the IP the connection arrived on ({local_ip})"
    problem = header_problem(headers)
    if problem:
        return 400, problem
    if port in PROXY_PORTS:
        return 503, f"port {port} is a proxy port"
    if port in config.deny_ports:
        return 401, f"port {port} is denied (--deny-port)"
    return 200, "accepted"


@dataclass
class InboundStream:
    """An accepted CONNECT stream whose body the server is reading."""

    authority: str
    peer: str
    headers: dict[str, str]
    digest: Any = field(default_factory=hashlib.sha256)
    length: int = 0


@dataclass
class Outbound:
    """Reply bytes waiting for flow-control window."""

    data: bytes
    end_stream: bool


class ServerConnection:
    """One HBONE connection, served in its own thread."""

    def __init__(self, tls: ssl.SSLSocket, client: str, identity: str,
                 config: ServerConfig, output: Output) -> None:
        self.tls = tls
        self.client = client
        self.identity = identity
        self.config = config
        self.output = output
        self.local_ip = str(plain_ip(str(tls.getsockname()[0])))
        self.connection = new_h2_connection(client_side=False, settings=SERVER_SETTINGS)
        self.streams: dict[int, InboundStream] = {}
        self.outbound: dict[int, Outbound] = {}
        self.replied = 0
        # The last stream id the GOAWAY we sent names, once sent.
        self.goaway_last_stream: int | None = None
        self.closing = False

    def serve(self) -> None:
        """Runs until the client closes the connection (or breaks the protocol, or the
        connection is retired and its streams are done)."""
        self.tls.settimeout(None)
        self.flush()
        while not self.closing:
            if self.goaway_last_stream is not None and not self.streams and not self.outbound:
                return
            data = self.tls.recv(READ_SIZE)
            if not data:
                return
            try:
                events = self.connection.receive_data(data)
            except ProtocolError as error:
                self.output.error(f"{self.client}: HTTP/2 protocol error: {error}")
                self.flush()
                return
            for event in events:
                self.handle(event)
            self.send_outbound()
            self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data:
            self.tls.sendall(data)

    def send_goaway(self, last_stream_id: int) -> None:
        """GOAWAY (NO_ERROR) naming `last_stream_id`, while the streams up to it go on.
        python-h2 would close the whole connection on its own GOAWAY, so the frame is written
        here, after what it has queued."""
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=ErrorCodes.NO_ERROR)
        self.tls.sendall(frame.serialize())
        self.goaway_last_stream = last_stream_id

    def handle(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self.on_request(event.stream_id, event.headers)
        elif isinstance(event, DataReceived):
            self.connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.digest.update(event.data)
                stream.length += len(event.data)
        elif isinstance(event, StreamEnded):
            self.on_body_end(event.stream_id)
        elif isinstance(event, StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            self.outbound.pop(event.stream_id, None)
            if stream is not None:
                self.log(event.stream_id, "CONNECT", stream.authority, 200,
                         f"reset by the client ({ErrorCodes(event.error_code).name})",
                         bytes=stream.length)
        elif isinstance(event, ConnectionTerminated):
            self.closing = True

    def on_request(self, stream_id: int, header_list: list[tuple[str, str]]) -> None:
        pseudo, headers = split_headers(header_list)
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority", "")
        if self.goaway_last_stream is not None and stream_id > self.goaway_last_stream:
            # Not processed: the client may send it again on another connection.
            self.connection.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.log(stream_id, method, authority, 0, "refused after GOAWAY (REFUSED_STREAM)")
            return
        status, reason = decide(method, authority, headers, self.local_ip, self.config)
        if status != 200:
            self.connection.send_headers(stream_id, [(":status", str(status))], end_stream=True)
            self.log(stream_id, method, authority, status, reason)
            return
        peer = forwarded_for(headers["forwarded"]) or ""
        kept = {name: headers[name] for name in ("forwarded", "baggage", "traceparent")}
        self.streams[stream_id] = InboundStream(authority, peer, kept)
        self.connection.send_headers(stream_id, [(":status", "200")])

    def on_body_end(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        reply = {
            "peer": stream.peer,
            "local": stream.authority,
            "bytes": stream.length,
            "sha256": stream.digest.hexdigest(),
            "client_identity": self.identity,
            "headers": stream.headers,
        }
        self.outbound[stream_id] = Outbound((json.dumps(reply) + "\n").encode(), True)
        self.log(stream_id, "CONNECT", stream.authority, 200, "replied", bytes=stream.length,
                 sha256=reply["sha256"], peer=stream.peer, headers=stream.headers)

    def send_outbound(self) -> None:
        """Sends what the flow-control windows allow of the waiting replies."""
        for stream_id, pending in list(self.outbound.items()):
            try:
                while pending.data:
                    window = self.connection.local_flow_control_window(stream_id)
                    size = min(window, self.connection.max_outbound_frame_size,
                               len(pending.data))
                    if size <= 0:
                        break
                    self.connection.send_data(stream_id, pending.data[:size])
                    pending.data = pending.data[size:]
                if not pending.data:
                    if pending.end_stream:
                        self.connection.end_stream(stream_id)
                        self.replied += 1
                        if self.replied == self.config.goaway_after:
                            self.send_goaway(self.connection.highest_inbound_stream_id)
                    del self.outbound[stream_id]
            except H2Error as error:
                self.output.error(f"{self.client}: stream {stream_id}: cannot reply: {error}")
                del self.outbound[stream_id]

    def log(self, stream_id: int, method: str, authority: str, status: int, reason: str,
            **extra: Any) -> None:
        self.output.record({
            "event": "stream",
            "client": self.client,
            "client_identity": self.identity,
            "stream_id": stream_id,
            "method": method,
            "authority": authority,
            "status": status,
            "reason": reason,
            **extra,
        })


def accept_tls(raw: socket.socket, context: ssl.SSLContext, trust_domain: str,
               timeout: float) -> tuple[ssl.SSLSocket, str]:
    """The TLS handshake and the checks ztunnel makes of a client; returns (socket, identity)."""
    raw.settimeout(timeout)
    try:
        tls = context.wrap_socket(raw, server_side=True)
    except OSError as error:
        raise PeerError(f"TLS handshake failed: {describe_os_error(error)}") from None
    alpn = tls.selected_alpn_protocol()
    if alpn != "h2":
        tls.close()
        raise PeerError(f"the client did not negotiate ALPN h2 (got {alpn!r})")
    identities = uri_sans(tls.getpeercert())
    domains = [spiffe_trust_domain(uri) for uri in identities]
    if trust_domain not in domains:
        tls.close()
        raise PeerError(f"client identity {identities or 'missing'} is not in trust domain "
                        f"{trust_domain}")
    return tls, identities[domains.index(trust_domain)]


# Serves one connection that passed accept_tls: (TLS socket, client "ip:port", identity).
ConnectionHandler = Callable[[ssl.SSLSocket, str, str], None]


def handle_connection(raw: socket.socket, address: tuple[Any, ...], context: ssl.SSLContext,
                      trust_domain: str, timeout: float, output: Output,
                      serve: ConnectionHandler) -> bool:
    """Serves one accepted connection; returns whether it went through TLS and HTTP/2."""
    client = socket_address(address)
    try:
        with raw:
            tls, identity = accept_tls(raw, context, trust_domain, timeout)
            with tls:
                serve(tls, client, identity)
        return True
    except PeerError as error:
        output.error(f"{client}: refused: {error}")
    except OSError as error:
        output.error(f"{client}: connection ended: {describe_os_error(error)}")
    except Exception:  # A bug in the peer: keep serving the others, but show it in full.
        output.error(f"{client}: internal error:\n{traceback.format_exc()}")
    return False


def run_server(args: argparse.Namespace) -> int:
    context = tls_context("server", args.ca, args.cert, args.key)
    config = ServerConfig(args.expect_client_trust_domain, frozenset(args.deny_port),
                          args.timeout, args.goaway_after)
    output = Output("server")

    def serve(tls: ssl.SSLSocket, client: str, identity: str) -> None:
        ServerConnection(tls, client, identity, config, output).serve()

    return listen_and_serve(args, context, output, serve)


def listen_and_serve(args: argparse.Namespace, context: ssl.SSLContext, output: Output,
                     serve: ConnectionHandler) -> int:
    """Listens on --listen, prints `ready`, then serves each connection in its own thread
    (or only the first one, with --once)."""
    ip, port = args.listen
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        listener = socket.create_server((ip, port), family=family, backlog=128)
    except OSError as error:
        raise PeerError(f"cannot listen on {format_address(ip, port)}: "
                        f"{describe_os_error(error)}") from None
    with listener:
        output.error(f"listening on {socket_address(listener.getsockname())}")
        output.line("ready")
        while True:
            raw, address = listener.accept()
            connection_args = (raw, address, context, args.expect_client_trust_domain,
                               args.timeout, output, serve)
            if getattr(args, "once", False):
                return 0 if handle_connection(*connection_args) else 1
            threading.Thread(target=handle_connection, args=connection_args, daemon=True).start()


# ---------------------------------------------------------------------------------------------
# Waypoint mode
# ---------------------------------------------------------------------------------------------

# How much of a buffer one non-blocking TLS write hands to OpenSSL.
SEND_SIZE = 256 * 1024
# The downstream stream ID 1 is the only stream of each upstream connection.
UPSTREAM_STREAM = 1


def error_name(code: int) -> str:
    """"CANCEL" for an HTTP/2 error code; hex for codes RFC 9113 does not define."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


@dataclass(frozen=True)
class WaypointConfig:
    trust_domain: str
    # Normalised "ip:port" authority -> (ip, port) of the workload it is relayed to.
    routes: dict[str, tuple[str, int]]
    upstream_port: int
    timeout: float


def route_argument(text: str) -> tuple[str, tuple[str, int]]:
    """argparse type for --route AUTHORITY=IP:PORT; returns (normalised authority, upstream)."""
    authority, equals, upstream = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"{text!r} is not AUTHORITY=IP:PORT")
    parse = address_argument(False)
    ip, port = parse(authority)
    return format_address(ip, port), parse(upstream)


def waypoint_decision(method: str, authority: str,
                      headers: dict[str, str]) -> tuple[int, str, tuple[str, int] | None]:
    """(status, reason, authority as (ip, port)) for a request to the waypoint. Unlike
    ztunnel, any destination IP is fine: a waypoint is sent the original destination."""
    if method != "CONNECT":
        return 400, f"method {method} is not CONNECT", None
    try:
        ip, port = parse_host_port(authority)
    except ValueError as error:
        return 400, f"bad authority: {error}", None
    if port is None:
        return 400, f"authority {authority!r} has no port", None
    problem = header_problem(headers)
    if problem:
        return 400, problem, None
    return 200, "accepted", (ip, port)


def next_traceparent(incoming: str) -> str:
    """A traceparent for the next hop: the same trace, a new parent span, the same flags."""
    match = TRACEPARENT.match(incoming)
    assert match is not None  # header_problem() accepted it
    return f"00-{match.group(1)}-{secrets.token_hex(8)}-{match.group(3)}"


@dataclass
class UpstreamLeg:
    """The waypoint's own HBONE connection to an upstream, carrying one CONNECT stream."""

    tls: ssl.SSLSocket
    connection: H2Connection
    # Bytes the socket has not taken yet (it is non-blocking once the leg is relayed).
    out: bytearray = field(default_factory=bytearray)
    # Why the connection is unusable (closed, GOAWAY, error), once it is.
    lost: str | None = None

    @property
    def sock(self) -> socket.socket:
        """The socket to select on."""
        return self.tls

    def queue_frames(self) -> None:
        """Moves what the HTTP/2 state machine has to send into `out`."""
        self.out += self.connection.data_to_send()

    def reset(self, code: int) -> None:
        """Resets the leg's one stream with `code`, if the connection still takes frames."""
        try:
            self.connection.reset_stream(UPSTREAM_STREAM, code)
        except H2Error:
            pass

    def close(self) -> None:
        """Says GOAWAY if still possible, then closes the socket."""
        if self.lost is None:
            try:
                self.connection.close_connection()
                self.out += self.connection.data_to_send()
                send_pending(self.tls, self.out)
            except (H2Error, OSError):
                pass
            self.lost = "closed by the waypoint"
        # Reading what is left first makes close() end with FIN rather than RST, which could
        # make the upstream drop our last frames (an RST_STREAM, say) unread.
        drain_quietly(self.tls)
        self.tls.close()


@dataclass
class UpstreamOutcome:
    """What dialling the upstream gave: a relayed leg (status 200) or a refusal."""

    status: int
    reason: str
    identity: str | None = None
    leg: UpstreamLeg | RawLeg | None = None
    # Events that arrived with the response (early DATA, END_STREAM, ...), not yet handled.
    events: list[Event] = field(default_factory=list)


def send_pending(sock: ssl.SSLSocket, buffer: bytearray) -> None:
    """Writes what a non-blocking socket takes now of `buffer`, removing it from the buffer.

    A write OpenSSL could not finish is retried with at least the same bytes (the buffer only
    grows at its end), as OpenSSL requires.
    """
    while buffer:
        try:
            sent = sock.send(buffer[:SEND_SIZE])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return
        del buffer[:sent]


def drain_quietly(sock: ssl.SSLSocket) -> None:
    """Reads and drops whatever a non-blocking socket has ready, ignoring errors."""
    try:
        sock.setblocking(False)
        while sock.recv(READ_SIZE):
            pass
    except (OSError, ValueError):
        pass


def open_upstream(upstream: tuple[str, int], headers: list[tuple[str, str]],
                  context: ssl.SSLContext, config: WaypointConfig) -> UpstreamOutcome:
    """Connects to the upstream's HBONE port, checks its identity, sends the CONNECT and waits
    for the response; blocking, at most --timeout in all. Runs in a thread of its own."""
    ip = upstream[0]
    target = format_address(ip, config.upstream_port)
    deadline = time.monotonic() + config.timeout
    try:
        raw = socket.create_connection((ip, config.upstream_port), timeout=config.timeout)
    except OSError as error:
        return UpstreamOutcome(503, f"cannot connect to {target}: {describe_os_error(error)}")
    try:
        tls = context.wrap_socket(raw, server_hostname=None)
    except OSError as error:
        raw.close()
        return UpstreamOutcome(503, f"TLS handshake with {target} failed: "
                               f"{describe_os_error(error)}")
    identities = uri_sans(tls.getpeercert())
    domains = [spiffe_trust_domain(uri) for uri in identities]
    identity = identities[domains.index(config.trust_domain)] \
        if config.trust_domain in domains else None
    refusal = None
    if tls.selected_alpn_protocol() != "h2":
        refusal = f"{target} did not negotiate ALPN h2 (got {tls.selected_alpn_protocol()!r})"
    elif identity is None:
        refusal = (f"{target}'s identity {identities or 'missing'} is not in trust domain "
                   f"{config.trust_domain}")
    if refusal:
        tls.close()
        return UpstreamOutcome(503, refusal, identities[0] if identities else None)
    try:
        return await_response(tls, headers, target, identity, deadline)
    except BaseException:
        tls.close()
        raise


def await_response(tls: ssl.SSLSocket, headers: list[tuple[str, str]], target: str,
                   identity: str, deadline: float) -> UpstreamOutcome:
    """Sends the CONNECT on a fresh HTTP/2 connection and waits for the response headers."""
    connection = new_h2_connection(client_side=True, settings=CLIENT_SETTINGS)
    connection.send_headers(UPSTREAM_STREAM, headers)

    def refused(reason: str, status: int = 503) -> UpstreamOutcome:
        tls.close()
        return UpstreamOutcome(status, reason, identity)

    try:
        while True:
            tls.settimeout(max(deadline - time.monotonic(), 0.001))
            tls.sendall(connection.data_to_send())
            if time.monotonic() >= deadline:
                return refused(f"{target} did not answer the CONNECT in time")
            data = tls.recv(READ_SIZE)
            if not data:
                return refused(f"{target} closed the connection before answering")
            events = connection.receive_data(data)
            for index, event in enumerate(events):
                if isinstance(event, ResponseReceived) and event.stream_id == UPSTREAM_STREAM:
                    status = dict(event.headers).get(":status", "")
                    if status != "200":
                        code = int(status) if status.isdigit() and len(status) == 3 else 503
                        return refused(f"{target} answered {status or 'no status'}", code)
                    tls.sendall(connection.data_to_send())
                    tls.setblocking(False)
                    leg = UpstreamLeg(tls, connection)
                    return UpstreamOutcome(200, "relayed", identity, leg, events[index + 1:])
                if isinstance(event, StreamReset) and event.stream_id == UPSTREAM_STREAM:
                    return refused(f"{target} reset the stream "
                                   f"({error_name(event.error_code)}) before answering")
                if isinstance(event, ConnectionTerminated):
                    return refused(f"{target} sent GOAWAY "
                                   f"({error_name(event.error_code)}) before answering")
    except TimeoutError:
        return refused(f"{target} did not answer the CONNECT in time")
    except ProtocolError as error:
        return refused(f"HTTP/2 protocol error from {target}: {error}")
    except OSError as error:
        return refused(f"connection to {target} failed: {describe_os_error(error)}")


@dataclass
class Relay:
    """One accepted downstream stream and its way onwards."""

    stream_id: int
    authority: str
    upstream: str
    forwarded_for: str
    leg: UpstreamLeg | RawLeg | None = None
    upstream_identity: str | None = None
    # Bytes received on one side and not yet sent on the other. They are acknowledged (their
    # flow-control window given back) only once sent on, so each buffer stays within a window.
    to_upstream: bytearray = field(default_factory=bytearray)
    to_downstream: bytearray = field(default_factory=bytearray)
    client_ended: bool = False
    upstream_ended: bool = False
    sent_end_up: bool = False
    sent_end_down: bool = False
    bytes_up: int = 0
    bytes_down: int = 0


class WaypointConnection:
    """One downstream HBONE connection and the upstream connections of its streams.

    A single thread owns every socket and HTTP/2 state machine of the connection and
    multiplexes them with a selector, so streams run concurrently without sharing an
    SSLSocket between threads (OpenSSL does not allow that). Only dialling an upstream, which
    blocks, happens in helper threads; they hand their outcome back through a queue.
    """

    def __init__(self, tls: ssl.SSLSocket, client: str, identity: str,
                 context: ssl.SSLContext, config: WaypointConfig, output: Output) -> None:
        self.tls = tls
        self.client = client
        self.identity = identity
        self.context = context
        self.config = config
        self.output = output
        self.connection = new_h2_connection(client_side=False, settings=SERVER_SETTINGS)
        self.out = bytearray()
        self.relays: dict[int, Relay] = {}
        self.selector = selectors.DefaultSelector()
        self.outcomes: queue.SimpleQueue[tuple[int, UpstreamOutcome]] = queue.SimpleQueue()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_writer.setblocking(False)
        # Taken by dialling threads so that no outcome is queued after the connection ended.
        self.lock = threading.Lock()
        self.over = False
        self.goaway = False
        # Why the downstream connection is over, once it is.
        self.closed: str | None = None

    # -- the loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        """Runs until the client closes the connection (or sent GOAWAY and no stream is left)."""
        self.tls.setblocking(False)
        self.wake_reader.setblocking(False)
        self.selector.register(self.tls, selectors.EVENT_READ, None)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, "wake")
        try:
            self.read_downstream()
            while True:
                for relay in list(self.relays.values()):
                    self.pump(relay)
                self.flush()
                if self.closed or (self.goaway and not self.relays):
                    return
                for key, mask in self.selector.select():
                    if key.data is None:
                        if mask & selectors.EVENT_READ:
                            self.read_downstream()
                    elif key.data == "wake":
                        self.take_outcomes()
                    elif mask & selectors.EVENT_READ and key.data.leg is not None:
                        self.read_upstream(key.data)
        finally:
            self.shut_down()

    def shut_down(self) -> None:
        with self.lock:
            self.over = True
        for relay in list(self.relays.values()):
            self.finish(relay, f"the downstream connection ended ({self.closed or 'GOAWAY'})",
                        reset_up=ErrorCodes.CANCEL)
        while True:
            try:
                _, outcome = self.outcomes.get_nowait()
            except queue.Empty:
                break
            if outcome.leg is not None:
                outcome.leg.close()
        self.selector.close()
        self.wake_reader.close()
        self.wake_writer.close()

    def flush(self) -> None:
        """Writes what the sockets take of every pending frame; selects for writing the rest."""
        try:
            self.out += self.connection.data_to_send()
            send_pending(self.tls, self.out)
            self.watch(self.tls, bool(self.out), None)
        except OSError as error:
            self.closed = f"sending failed: {describe_os_error(error)}"
        for relay in list(self.relays.values()):
            leg = relay.leg
            if leg is None or leg.lost:
                continue
            try:
                leg.queue_frames()
                send_pending(leg.sock, leg.out)
                self.watch(leg.sock, bool(leg.out), relay)
            except OSError as error:
                self.lose_upstream(relay, f"sending failed: {describe_os_error(error)}")

    def watch(self, sock: ssl.SSLSocket, writing: bool, data: Any) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        if self.selector.get_key(sock).events != events:
            self.selector.modify(sock, events, data)

    # -- the downstream side -------------------------------------------------------------------

    def read_downstream(self) -> None:
        """Handles everything readable now (TLS may hold decrypted bytes select() misses)."""
        while not self.closed:
            try:
                data = self.tls.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError as error:
                self.closed = describe_os_error(error)
                return
            if not data:
                self.closed = "the client closed it"
                return
            try:
                events = self.connection.receive_data(data)
            except ProtocolError as error:
                self.output.error(f"{self.client}: HTTP/2 protocol error: {error}")
                self.closed = f"protocol error: {error}"
                self.flush()
                return
            for event in events:
                self.on_downstream(event)

    def on_downstream(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self.on_request(event.stream_id, event.headers)
            return
        if isinstance(event, ConnectionTerminated):
            self.goaway = True
            return
        relay = self.relays.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, DataReceived):
            # Padding is never relayed, so its window goes back at once; data's once sent on.
            held = len(event.data) if relay is not None else 0
            if event.flow_controlled_length > held:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length - held, event.stream_id)
            if relay is not None:
                relay.to_upstream += event.data
        elif isinstance(event, StreamEnded) and relay is not None:
            relay.client_ended = True
        elif isinstance(event, StreamReset) and relay is not None:
            # The same error code goes on, as ztunnel passes a reset on.
            code = int(event.error_code)
            self.finish(relay, f"reset by the client ({error_name(code)})", reset_up=code)

    def on_request(self, stream_id: int, header_list: list[tuple[str, str]]) -> None:
        pseudo, headers = split_headers(header_list)
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority", "")
        status, reason, destination = waypoint_decision(method, authority, headers)
        if destination is None:
            self.connection.send_headers(stream_id, [(":status", str(status))], end_stream=True)
            self.log(stream_id, method, authority, status, reason)
            return
        upstream = self.config.routes.get(format_address(*destination), destination)
        original = forwarded_for(headers["forwarded"]) or ""
        relay = Relay(stream_id, authority, format_address(*upstream), original)
        self.relays[stream_id] = relay
        onward = [
            (":method", "CONNECT"),
            (":authority", relay.upstream),
            ("forwarded", f'for="{original}"'),
            ("baggage", headers["baggage"]),
            ("traceparent", next_traceparent(headers["traceparent"])),
        ]
        threading.Thread(target=self.dial, args=(stream_id, upstream, onward),
                         daemon=True).start()

    # -- dialling (helper threads) ---------------------------------------------------------------

    def dial(self, stream_id: int, upstream: tuple[str, int],
             headers: list[tuple[str, str]]) -> None:
        try:
            outcome = self.open_upstream(upstream, headers)
        except Exception:  # A bug in the peer: the stream must still be answered.
            self.output.error(f"{self.client}: internal error:\n{traceback.format_exc()}")
            outcome = UpstreamOutcome(503, "internal error in the waypoint")
        with self.lock:
            if not self.over:
                self.outcomes.put((stream_id, outcome))
                try:
                    self.wake_writer.send(b"\0")
                except BlockingIOError:
                    pass  # Already awake with bytes to read.
                return
        if outcome.leg is not None:
            outcome.leg.close()

    def open_upstream(self, upstream: tuple[str, int],
                      headers: list[tuple[str, str]]) -> UpstreamOutcome:
        """The blocking dial of one stream's upstream (in a helper thread)."""
        return open_upstream(upstream, headers, self.context, self.config)

    def take_outcomes(self) -> None:
        try:
            while self.wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                stream_id, outcome = self.outcomes.get_nowait()
            except queue.Empty:
                return
            relay = self.relays.get(stream_id)
            if relay is None:  # The client reset the stream meanwhile.
                if outcome.leg is not None:
                    outcome.leg.close()
                continue
            relay.upstream_identity = outcome.identity
            if outcome.leg is None:
                self.refuse(relay, outcome.status, outcome.reason)
                continue
            relay.leg = outcome.leg
            self.connection.send_headers(stream_id, [(":status", "200")])
            self.selector.register(relay.leg.sock, selectors.EVENT_READ, relay)
            for event in outcome.events:
                self.on_upstream(relay, event)
            self.read_upstream(relay)

    def refuse(self, relay: Relay, status: int, reason: str) -> None:
        """Answers a stream the upstream did not take with the upstream's status (or 503)."""
        del self.relays[relay.stream_id]
        self.output.error(f"{self.client}: stream {relay.stream_id} to {relay.authority} via "
                          f"{relay.upstream}: upstream refused: {reason}; answering {status}")
        try:
            if relay.to_upstream:
                self.connection.acknowledge_received_data(len(relay.to_upstream),
                                                          relay.stream_id)
            self.connection.send_headers(relay.stream_id, [(":status", str(status))],
                                         end_stream=True)
        except H2Error:
            pass
        self.log_relay(relay, status, f"upstream refused: {reason}")

    # -- the upstream side ---------------------------------------------------------------------

    def read_upstream(self, relay: Relay) -> None:
        leg = relay.leg
        while leg is not None and leg.lost is None and relay.stream_id in self.relays:
            try:
                data = leg.tls.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError as error:
                self.lose_upstream(relay, describe_os_error(error))
                return
            if not data:
                self.lose_upstream(relay, "the upstream closed the connection")
                return
            try:
                events = leg.connection.receive_data(data)
            except ProtocolError as error:
                self.lose_upstream(relay, f"HTTP/2 protocol error from the upstream: {error}")
                return
            for event in events:
                self.on_upstream(relay, event)

    def on_upstream(self, relay: Relay, event: Event) -> None:
        leg = relay.leg
        assert leg is not None
        if isinstance(event, DataReceived):
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                leg.connection.acknowledge_received_data(padding, event.stream_id)
            relay.to_downstream += event.data
        elif isinstance(event, StreamEnded):
            relay.upstream_ended = True
        elif isinstance(event, StreamReset):
            code = int(event.error_code)
            self.finish(relay, f"reset by the upstream ({error_name(code)})", reset_down=code)
        elif isinstance(event, ConnectionTerminated):
            # python-h2 takes no frames after GOAWAY: the stream can go no further upstream.
            self.lose_upstream(relay, f"the upstream sent GOAWAY "
                               f"({error_name(event.error_code)})")

    def lose_upstream(self, relay: Relay, why: str) -> None:
        """Marks the upstream connection unusable; pump() decides what that means."""
        leg = relay.leg
        if leg is None or leg.lost is not None:
            return
        leg.lost = why
        self.selector.unregister(leg.sock)

    # -- relaying ------------------------------------------------------------------------------

    def pump(self, relay: Relay) -> None:
        """Moves buffered bytes and END_STREAMs on as far as the windows allow, and finishes
        the relay once both directions ended (or it can go no further)."""
        leg = relay.leg
        if leg is None:
            return  # Still dialling.
        try:
            if leg.lost is None:
                moved = send_within_window(leg.connection, UPSTREAM_STREAM, relay.to_upstream)
                if moved:
                    self.connection.acknowledge_received_data(moved, relay.stream_id)
                    relay.bytes_up += moved
                if relay.client_ended and not relay.to_upstream and not relay.sent_end_up:
                    leg.connection.end_stream(UPSTREAM_STREAM)
                    relay.sent_end_up = True
            moved = send_within_window(self.connection, relay.stream_id, relay.to_downstream)
            if moved:
                if leg.lost is None:
                    leg.connection.acknowledge_received_data(moved, UPSTREAM_STREAM)
                relay.bytes_down += moved
            if relay.upstream_ended and not relay.to_downstream and not relay.sent_end_down:
                self.connection.end_stream(relay.stream_id)
                relay.sent_end_down = True
        except H2Error as error:
            self.finish(relay, f"relaying failed: {error!r}", reset_up=ErrorCodes.CANCEL,
                        reset_down=ErrorCodes.CONNECT_ERROR)
            return
        if relay.sent_end_up and relay.sent_end_down:
            self.finish(relay, "relayed")
        elif leg.lost is not None and not (relay.sent_end_up and relay.upstream_ended):
            # The upstream side is gone before its stream was done: so is the stream.
            self.finish(relay, f"upstream connection lost: {leg.lost}",
                        reset_down=ErrorCodes.CONNECT_ERROR)

    def finish(self, relay: Relay, reason: str, reset_up: int | None = None,
               reset_down: int | None = None) -> None:
        """Ends a relay: resets what is asked, closes the upstream connection, logs the stream."""
        if self.relays.pop(relay.stream_id, None) is None:
            return
        try:
            if reset_down is not None:
                self.connection.reset_stream(relay.stream_id, reset_down)
            if relay.to_upstream:  # Never sent on: give the window back all the same.
                self.connection.acknowledge_received_data(len(relay.to_upstream),
                                                          relay.stream_id)
        except H2Error:
            pass
        leg = relay.leg
        if leg is not None:
            if leg.lost is None:
                self.selector.unregister(leg.sock)
                if reset_up is not None:
                    leg.reset(reset_up)
            leg.close()
        self.log_relay(relay, 200, reason)

    # -- output --------------------------------------------------------------------------------

    def log_relay(self, relay: Relay, status: int, reason: str) -> None:
        self.log(relay.stream_id, "CONNECT", relay.authority, status, reason,
                 upstream=relay.upstream, upstream_identity=relay.upstream_identity,
                 forwarded_for=relay.forwarded_for, bytes_up=relay.bytes_up,
                 bytes_down=relay.bytes_down)

    def log(self, stream_id: int, method: str, authority: str, status: int, reason: str,
            upstream: str | None = None, upstream_identity: str | None = None,
            forwarded_for: str | None = None, bytes_up: int = 0, bytes_down: int = 0) -> None:
        # The same keys on every line, null when unknown, so readers need no special cases.
        self.output.record({
            "event": "stream",
            "client": self.client,
            "client_identity": self.identity,
            "stream_id": stream_id,
            "method": method,
            "authority": authority,
            "upstream": upstream,
            "upstream_identity": upstream_identity,
            "forwarded_for": forwarded_for,
            "status": status,
            "reason": reason,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        })


def send_within_window(connection: H2Connection, stream_id: int, buffer: bytearray) -> int:
    """Sends as much of `buffer` as the flow-control windows allow; returns how many bytes."""
    moved = 0
    while buffer:
        size = min(connection.local_flow_control_window(stream_id),
                   connection.max_outbound_frame_size, len(buffer))
        if size <= 0:
            break
        connection.send_data(stream_id, bytes(buffer[:size]))
        del buffer[:size]
        moved += size
    return moved


# ---------------------------------------------------------------------------------------------
# Gateway mode
# ---------------------------------------------------------------------------------------------


@dataclass
class RawLeg:
    """An east-west gateway's TCP connection onwards for one stream: bytes as they come."""

    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    lost: str | None = None

    def queue_frames(self) -> None:
        """Nothing to frame: `pump` puts the bytes in `out` itself."""

    def reset(self, code: int) -> None:
        """TCP has no stream to reset: closing the connection says it."""

    def close(self) -> None:
        if self.lost is None:
            self.lost = "closed by the gateway"
        self.sock.close()


class GatewayConnection(WaypointConnection):
    """One downstream connection of an east-west gateway (Istio's multi-network): each
    CONNECT's authority (with --route, its route) is dialled over plain TCP, and the stream's
    bytes are relayed both ways unchanged. For double HBONE the authority is the destination's
    HBONE port, so the inner connection's TLS runs end to end through the gateway."""

    def on_request(self, stream_id: int, header_list: list[tuple[str, str]]) -> None:
        """As the waypoint, and says at once which streams it relays: a double-HBONE stream
        lasts as long as the inner connection, which its client pools."""
        super().on_request(stream_id, header_list)
        relay = self.relays.get(stream_id)
        if relay is not None:
            self.output.record({
                "event": "relaying",
                "client": self.client,
                "client_identity": self.identity,
                "stream_id": stream_id,
                "authority": relay.authority,
                "upstream": relay.upstream,
            })

    def open_upstream(self, upstream: tuple[str, int],
                      headers: list[tuple[str, str]]) -> UpstreamOutcome:
        target = format_address(*upstream)
        try:
            sock = socket.create_connection(upstream, timeout=self.config.timeout)
        except OSError as error:
            return UpstreamOutcome(503, f"cannot connect to {target}: "
                                   f"{describe_os_error(error)}")
        sock.setblocking(False)
        return UpstreamOutcome(200, "relayed", None, RawLeg(sock))

    def read_upstream(self, relay: Relay) -> None:
        leg = relay.leg
        while leg is not None and leg.lost is None:
            try:
                data = leg.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError as error:
                self.lose_upstream(relay, describe_os_error(error))
                return
            if not data:
                # The upstream is done (an HBONE peer closes both ways): what it sent goes
                # on, then END_STREAM.
                relay.upstream_ended = True
                self.lose_upstream(relay, "the upstream closed the connection")
                return
            relay.to_downstream += data

    def pump(self, relay: Relay) -> None:
        leg = relay.leg
        if leg is None:
            return  # Still dialling.
        try:
            if leg.lost is None:
                moved = len(relay.to_upstream)
                if moved:
                    leg.out += relay.to_upstream
                    relay.to_upstream.clear()
                    self.connection.acknowledge_received_data(moved, relay.stream_id)
                    relay.bytes_up += moved
                if relay.client_ended and not relay.sent_end_up:
                    send_pending(leg.sock, leg.out)
                    if not leg.out:
                        leg.sock.shutdown(socket.SHUT_WR)
                        relay.sent_end_up = True
            relay.bytes_down += send_within_window(self.connection, relay.stream_id,
                                                   relay.to_downstream)
            if relay.upstream_ended and not relay.to_downstream and not relay.sent_end_down:
                self.connection.end_stream(relay.stream_id)
                relay.sent_end_down = True
        except (H2Error, OSError) as error:
            self.finish(relay, f"relaying failed: {error!r}",
                        reset_down=ErrorCodes.CONNECT_ERROR)
            return
        if relay.sent_end_down and (relay.sent_end_up or leg.lost is not None):
            self.finish(relay, "relayed")
        elif leg.lost is not None and not relay.upstream_ended:
            self.finish(relay, f"upstream connection lost: {leg.lost}",
                        reset_down=ErrorCodes.CONNECT_ERROR)


def run_gateway(args: argparse.Namespace) -> int:
    return run_relay(args, "gateway", GatewayConnection)


def run_waypoint(args: argparse.Namespace) -> int:
    return run_relay(args, "waypoint", WaypointConnection)


def run_relay(args: argparse.Namespace, mode: str,
              connection: type[WaypointConnection]) -> int:
    server_context = tls_context("server", args.ca, args.cert, args.key)
    client_context = tls_context("client", args.ca, args.cert, args.key)
    routes: dict[str, tuple[str, int]] = {}
    for authority, upstream in args.route:
        if routes.setdefault(authority, upstream) != upstream:
            raise UsageError(f"--route {authority} is given twice with different upstreams")
    config = WaypointConfig(args.expect_client_trust_domain, routes,
                            args.upstream_hbone_port, args.timeout)
    output = Output(mode)

    def serve(tls: ssl.SSLSocket, client: str, identity: str) -> None:
        connection(tls, client, identity, client_context, config, output).serve()

    return listen_and_serve(args, server_context, output, serve)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peer.py",
        description="An independent HBONE peer (HTTP/2 CONNECT over mutual TLS 1.3), "
        "wire-compatible with Istio's ztunnel.",
    )
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def tls_options(mode: argparse.ArgumentParser) -> None:
        mode.add_argument("--ca", required=True, metavar="ROOT.pem",
                          help="root CA certificate(s) to verify the other side against")
        mode.add_argument("--cert", required=True, metavar="CERT.pem",
                          help="this side's certificate chain (leaf first), PEM")
        mode.add_argument("--key", required=True, metavar="KEY.pem",
                          help="the private key of --cert, PEM")
        mode.add_argument("--timeout", type=positive_float, default=10.0, metavar="SECONDS",
                          help="limit for every network wait (default: %(default)s)")

    def relay_options(mode: argparse.ArgumentParser, trust_domain_help: str) -> None:
        """The options the relaying modes (waypoint, gateway) share."""
        mode.add_argument("--listen", required=True, type=address_argument(True),
                          metavar="IP:PORT",
                          help="address to listen on, e.g. 10.0.0.3:15008 (port 0: any free port)")
        tls_options(mode)
        mode.add_argument("--expect-client-trust-domain", required=True, metavar="DOMAIN",
                          help=trust_domain_help)
        mode.add_argument("--route", type=route_argument, action="append", default=[],
                          metavar="AUTHORITY=IP:PORT",
                          help="relay CONNECTs to AUTHORITY (a service VIP:port, say) to "
                          "IP:PORT instead (may be repeated; unrouted authorities go to "
                          "themselves)")

    client = modes.add_parser(
        "client",
        help="check an HBONE server",
        description="Connect to an HBONE server, check its identity and SETTINGS, run the "
        "requests of a spec file and print one JSON report. Exit 0 only if every check passed.",
    )
    client.add_argument("--connect", required=True, type=address_argument(False), metavar="IP:PORT",
                        help="the HBONE server, e.g. 10.0.0.2:15008")
    tls_options(client)
    client.add_argument("--expect-identity", required=True, metavar="SPIFFE_ID",
                        help="the URI SAN the server's certificate must carry")
    client.add_argument("--check", required=True, metavar="SPEC.json",
                        help="JSON list of requests: {name, method, authority, expect_status, "
                        "send, expect_reply_json, headers}")
    client.add_argument("--await-goaway", type=positive_float, metavar="SECONDS",
                        help="after the checks, print 'awaiting GOAWAY' on stderr and wait up to "
                        "SECONDS for the server to send GOAWAY (one more check)")
    client.set_defaults(run=run_client)

    server = modes.add_parser(
        "server",
        help="serve HBONE like Istio's ztunnel",
        description="Accept HBONE connections like Istio's ztunnel and, for each accepted "
        "CONNECT, reply with one JSON line describing the bytes received. Prints 'ready' "
        "once listening and one JSON line per finished stream.",
    )
    server.add_argument("--listen", required=True, type=address_argument(True), metavar="IP:PORT",
                        help="address to listen on, e.g. 10.0.0.2:15008 (port 0: any free port)")
    tls_options(server)
    server.add_argument("--expect-client-trust-domain", required=True, metavar="DOMAIN",
                        help="the trust domain the client's SPIFFE identity must be in")
    server.add_argument("--deny-port", type=int, action="append", default=[], metavar="PORT",
                        help="answer 401 to CONNECTs to this port (may be repeated)")
    server.add_argument("--goaway-after", type=positive_int, metavar="N",
                        help="retire each connection once it has replied to N streams: GOAWAY "
                        "(NO_ERROR) naming the last stream received, REFUSED_STREAM for later "
                        "ones, closed once the named ones are done")
    server.add_argument("--once", action="store_true",
                        help="exit after the first connection closes (status 0 if it got "
                        "through TLS and HTTP/2, else 1)")
    server.set_defaults(run=run_server)

    waypoint = modes.add_parser(
        "waypoint",
        help="relay HBONE streams onwards like an Istio waypoint (L4)",
        description="Accept HBONE connections like the server mode (any authority IP is "
        "fine) and relay each accepted CONNECT over a new mutual-TLS HBONE connection to "
        "UPSTREAM_IP:--upstream-hbone-port, with CONNECT to UPSTREAM_IP:PORT, where the "
        "authority's --route gives UPSTREAM_IP:PORT (by default the authority itself). 200 is "
        "answered only after the upstream's 200; an upstream's refusal status is passed on "
        "(503 when it gave none). Prints 'ready' once listening and one JSON line per "
        "finished stream.",
    )
    relay_options(waypoint, "the trust domain the SPIFFE identities of clients and of "
                  "upstreams must be in")
    waypoint.add_argument("--upstream-hbone-port", type=address_port, default=15008,
                          metavar="PORT",
                          help="the HBONE port of upstream workloads' nodes "
                          "(default: %(default)s)")
    waypoint.set_defaults(run=run_waypoint)

    gateway = modes.add_parser(
        "gateway",
        help="relay HBONE streams onwards over TCP like an Istio east-west gateway",
        description="Accept HBONE connections like the server mode and relay each accepted "
        "CONNECT over a new TCP connection to its authority (or the authority's --route), "
        "the bytes unchanged both ways: for double HBONE the authority is the destination's "
        "HBONE port and the inner connection's TLS runs end to end. Prints 'ready' once "
        "listening, one JSON line (event 'relaying') per stream it starts relaying and one "
        "per finished stream.",
    )
    relay_options(gateway, "the trust domain the client's SPIFFE identity must be in")
    gateway.set_defaults(run=run_gateway, upstream_hbone_port=15008)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as error:
        print(f"peer.py {args.mode}: error: {error}", file=sys.stderr)
        return 2
    except PeerError as error:
        print(f"peer.py {args.mode}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
