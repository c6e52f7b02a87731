"""Self-test of the HBONE peer: its modes against each other.

Run from the repository root:  python3 -m unittest tests/hbone_peer/test_peer_selftest.py

It makes throwaway certificates with the `openssl` command line (an ECDSA P-256 root CA and
leaves carrying SPIFFE URI SANs) and only uses loopback addresses: 127.0.0.1 for the client
side, 127.0.0.2-6 for the nodes behind the waypoint (Linux routes all of 127/8 to `lo`).
"""

from __future__ import annotations

import hashlib
import json
import re
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, Event, RequestReceived, StreamEnded, StreamReset

PEER = Path(__file__).resolve().parent / "peer.py"
# The waypoint tests also use the peer's building blocks in this process (as a scripted
# upstream and as a client that needs finer control than the client mode's spec).
sys.path.insert(0, str(PEER.parent))
import peer  # noqa: E402
HOST = "127.0.0.1"
SERVER_ID = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
FOREIGN_ID = "spiffe://other.domain/ns/default/sa/client"
# Limit for any one peer process in these tests.
PROCESS_TIMEOUT = 30


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


class Pki:
    """A root CA in a directory, and leaves it signs."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = directory / f"{name}-ca.key"
        self.cert = directory / f"{name}-ca.pem"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", str(self.key))
        openssl("req", "-x509", "-new", "-key", str(self.key), "-subj", f"/O={name} root",
                "-days", "2", "-out", str(self.cert),
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(self, label: str, spiffe_id: str) -> tuple[Path, Path]:
        """A leaf certificate for a SPIFFE identity; returns (cert, key)."""
        key = self.directory / f"{label}.key"
        csr = self.directory / f"{label}.csr"
        cert = self.directory / f"{label}.pem"
        extensions = self.directory / f"{label}.ext"
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName=critical,URI:{spiffe_id}\n"
        )
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", str(key))
        openssl("req", "-new", "-key", str(key), "-subj", f"/O={label}", "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                "-days", "1",
                "-extfile", str(extensions), "-out", str(cert))
        return cert, key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class PeerListener:
    """`peer.py server` or `peer.py waypoint` in the background, its stdout lines collected."""

    def __init__(self, mode: str, listen: str, ca: Path, cert: Path, key: Path,
                 *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PEER), mode, "--listen", listen,
             "--ca", str(ca), "--cert", str(cert), "--key", str(key),
             "--expect-client-trust-domain", "cluster.local", "--timeout", "5", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        # Every JSON line read by wait_for_records(), kept for later searches.
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        try:
            first = self.lines.get(timeout=10)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"peer.py {mode} did not print 'ready': {self.stderr}") from None
        if first != "ready":
            self.stop()
            raise AssertionError(f"peer.py {mode} printed {first!r} instead of 'ready'")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines printed so far."""
        found = []
        while not self.lines.empty():
            found.append(json.loads(self.lines.get_nowait()))
        return found

    def wait_for_records(self, match: Callable[[dict[str, Any]], bool], count: int = 1,
                         timeout: float = 5.0) -> list[dict[str, Any]]:
        """The JSON lines `match` accepts, once there are `count` of them (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            self.seen += self.records()
            found = [record for record in self.seen if match(record)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class PeerServer(PeerListener):
    """`peer.py server` in the background."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path, *extra: str,
                 host: str = HOST) -> None:
        super().__init__("server", f"{host}:{port}", ca, cert, key, *extra)


class PeerSelfTest(unittest.TestCase):
    tmp: tempfile.TemporaryDirectory[str]
    pki: Pki
    port: int
    server: PeerServer
    client_cert: tuple[Path, Path]
    spec_count = 0

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory(prefix="hbone-peer-")
        directory = Path(cls.tmp.name)
        cls.pki = Pki(directory, "mesh")
        cls.server_cert = cls.pki.leaf("server", SERVER_ID)
        cls.client_cert = cls.pki.leaf("client", CLIENT_ID)
        cls.port = free_port()
        cls.server = PeerServer(cls.port, cls.pki.cert, *cls.server_cert, "--deny-port", "9999")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls.tmp.cleanup()

    def write_spec(self, checks: list[dict[str, Any]] | str) -> Path:
        PeerSelfTest.spec_count += 1
        path = Path(self.tmp.name) / f"spec-{PeerSelfTest.spec_count}.json"
        path.write_text(checks if isinstance(checks, str) else json.dumps(checks))
        return path

    def run_client(self, spec: Path, *, port: int | None = None,
                   cert: tuple[Path, Path] | None = None, ca: Path | None = None,
                   identity: str = SERVER_ID, timeout: str = "5", extra: tuple[str, ...] = ()
                   ) -> tuple[int, dict[str, Any] | None, str]:
        """Runs `peer.py client`; returns (exit status, parsed report or None, stderr)."""
        cert_path, key_path = cert or self.client_cert
        completed = subprocess.run(
            [sys.executable, str(PEER), "client", "--connect", f"{HOST}:{port or self.port}",
             "--ca", str(ca or self.pki.cert), "--cert", str(cert_path), "--key", str(key_path),
             "--expect-identity", identity, "--check", str(spec), "--timeout", timeout,
             *extra],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
        )
        self.assertNotIn("Traceback", completed.stderr)
        report = json.loads(completed.stdout) if completed.stdout.strip() else None
        return completed.returncode, report, completed.stderr

    def checks_by_name(self, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {check["name"]: check for check in report["checks"]}

    def test_contract_checks_pass(self) -> None:
        here = f"{HOST}:8080"
        spec = self.write_spec([
            {"name": "small", "method": "CONNECT", "authority": here, "expect_status": 200,
             "send": 1000, "expect_reply_json": True},
            {"name": "empty", "method": "CONNECT", "authority": here, "expect_status": 200,
             "send": 0, "expect_reply_json": True},
            # More than the 4 MiB stream window: the client must wait for WINDOW_UPDATEs.
            {"name": "large", "method": "CONNECT", "authority": here, "expect_status": 200,
             "send": 6 * 1024 * 1024, "expect_reply_json": True},
            {"name": "status only", "method": "CONNECT", "authority": here,
             "expect_status": 200},
            {"name": "no port", "method": "CONNECT", "authority": HOST, "expect_status": 400},
            {"name": "other ip", "method": "CONNECT", "authority": "127.0.0.2:8080",
             "expect_status": 400},
            {"name": "get", "method": "GET", "authority": here, "expect_status": 400},
            {"name": "proxy port 15008", "authority": f"{HOST}:15008", "expect_status": 503},
            {"name": "proxy port 15006", "authority": f"{HOST}:15006", "expect_status": 503},
            {"name": "denied", "authority": f"{HOST}:9999", "expect_status": 401},
        ])
        status, report, stderr = self.run_client(spec)
        self.assertIsNotNone(report, stderr)
        assert report is not None
        self.assertEqual(status, 0, json.dumps(report, indent=2))
        self.assertTrue(report["ok"])
        self.assertEqual(report["server_identity"], SERVER_ID)
        self.assertEqual(report["alpn"], "h2")
        self.assertEqual(report["tls_version"], "TLSv1.3")
        self.assertEqual(report["settings"]["initial_window_size"], 4194304)
        self.assertEqual(report["settings"]["max_frame_size"], 1048576)
        self.assertEqual(report["settings"]["max_concurrent_streams"], 200)
        self.assertEqual(report["settings"]["connection_window"], 16 * 1024 * 1024)
        checks = self.checks_by_name(report)
        self.assertEqual(len(checks), 11)
        self.assertTrue(checks["server_settings"]["ok"])
        reply = checks["small"]["reply"]
        self.assertEqual(reply["bytes"], 1000)
        self.assertEqual(reply["local"], here)
        self.assertEqual(reply["client_identity"], CLIENT_ID)
        self.assertTrue(reply["peer"].startswith(f"{HOST}:"))
        self.assertRegex(reply["headers"]["traceparent"], r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
        self.assertEqual(checks["large"]["reply"]["bytes"], 6 * 1024 * 1024)

    def test_failed_expectation_is_reported(self) -> None:
        spec = self.write_spec([
            {"name": "wrong", "authority": HOST, "expect_status": 200, "send": 10},
            {"name": "still runs", "authority": f"{HOST}:80", "expect_status": 200},
        ])
        status, report, _ = self.run_client(spec)
        assert report is not None
        self.assertEqual(status, 1)
        self.assertFalse(report["ok"])
        checks = self.checks_by_name(report)
        self.assertFalse(checks["wrong"]["ok"])
        self.assertIn("status 400, expected 200", checks["wrong"]["detail"])
        self.assertTrue(checks["still runs"]["ok"])

    def test_server_checks_request_headers(self) -> None:
        here = f"{HOST}:8080"
        spec = self.write_spec([
            {"name": "no traceparent", "authority": here, "expect_status": 400,
             "headers": {"traceparent": None}},
            {"name": "bad traceparent", "authority": here, "expect_status": 400,
             "headers": {"traceparent": "01-xyz"}},
            {"name": "no forwarded", "authority": here, "expect_status": 400,
             "headers": {"forwarded": None}},
            {"name": "forwarded without port", "authority": here, "expect_status": 400,
             "headers": {"forwarded": 'for="10.0.0.1"'}},
            {"name": "bad baggage", "authority": here, "expect_status": 400,
             "headers": {"baggage": "no-equals-sign"}},
            {"name": "no baggage", "authority": here, "expect_status": 400,
             "headers": {"baggage": None}},
            {"name": "chosen forwarded", "authority": here, "expect_status": 200, "send": 5,
             "expect_reply_json": True, "headers": {"forwarded": 'for="10.1.2.3:4567"'}},
        ])
        status, report, _ = self.run_client(spec)
        assert report is not None
        self.assertEqual(status, 0, json.dumps(report, indent=2))
        self.assertEqual(self.checks_by_name(report)["chosen forwarded"]["reply"]["peer"],
                         "10.1.2.3:4567")

    def test_concurrent_clients(self) -> None:
        spec = self.write_spec([
            {"name": f"stream {index}", "authority": f"{HOST}:7000", "expect_status": 200,
             "send": 300_000 + index, "expect_reply_json": True}
            for index in range(3)
        ])
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: self.run_client(spec), range(4)))
        for status, report, stderr in results:
            self.assertEqual(status, 0, f"{report}\n{stderr}")

    def test_server_logs_each_stream(self) -> None:
        self.server.records()  # Skip what earlier tests logged.
        spec = self.write_spec([
            {"name": "logged", "authority": f"{HOST}:6000", "expect_status": 200, "send": 42,
             "expect_reply_json": True},
            {"name": "logged refusal", "authority": f"{HOST}:15001", "expect_status": 503},
        ])
        status, _, stderr = self.run_client(spec)
        self.assertEqual(status, 0, stderr)
        deadline = time.monotonic() + 5
        records: list[dict[str, Any]] = []
        while len(records) < 2 and time.monotonic() < deadline:
            records += [r for r in self.server.records() if r["authority"].endswith(":6000")
                        or r["authority"].endswith(":15001")]
            time.sleep(0.05)
        by_status = {record["status"]: record for record in records}
        self.assertEqual(by_status[200]["bytes"], 42)
        self.assertEqual(by_status[200]["client_identity"], CLIENT_ID)
        self.assertIn("proxy port", by_status[503]["reason"])

    def test_wrong_server_identity(self) -> None:
        spec = self.write_spec([{"name": "any", "authority": f"{HOST}:80",
                                 "expect_status": 200}])
        status, report, stderr = self.run_client(
            spec, identity="spiffe://cluster.local/ns/default/sa/someone-else")
        assert report is not None
        self.assertEqual(status, 1)
        self.assertIn("identity", report["error"])
        self.assertIn("expected spiffe://cluster.local/ns/default/sa/someone-else", stderr)
        self.assertEqual(report["checks"], [])

    def test_client_outside_trust_domain_is_refused(self) -> None:
        foreign = self.pki.leaf("foreign", FOREIGN_ID)
        spec = self.write_spec([{"name": "any", "authority": f"{HOST}:80",
                                 "expect_status": 200}])
        status, report, stderr = self.run_client(spec, cert=foreign)
        assert report is not None
        self.assertEqual(status, 1)
        self.assertFalse(report["ok"])
        self.assertIn("closed", stderr)

    def test_client_from_another_ca_is_refused(self) -> None:
        other = Pki(Path(self.tmp.name), "other")
        stranger = other.leaf("stranger", CLIENT_ID)
        spec = self.write_spec([{"name": "any", "authority": f"{HOST}:80",
                                 "expect_status": 200}])
        status, report, stderr = self.run_client(spec, cert=stranger)
        assert report is not None
        self.assertEqual(status, 1)
        self.assertIn("TLS error", stderr)

    def test_connection_refused(self) -> None:
        spec = self.write_spec([])
        started = time.monotonic()
        status, report, stderr = self.run_client(spec, port=free_port())
        assert report is not None
        self.assertEqual(status, 1)
        self.assertIn("cannot connect", stderr)
        self.assertLess(time.monotonic() - started, 5)

    def test_silent_server_times_out(self) -> None:
        with socket.create_server((HOST, 0)) as silent:
            spec = self.write_spec([])
            started = time.monotonic()
            status, _, stderr = self.run_client(spec, port=silent.getsockname()[1],
                                                timeout="1")
        self.assertEqual(status, 1)
        self.assertIn("timed out", stderr)
        self.assertLess(time.monotonic() - started, 5)

    def test_bad_spec_is_a_usage_error(self) -> None:
        for text, message in [("{not json", "not valid JSON"),
                              ('[{"name": "x", "authority": "1.2.3.4:5"}]', "expect_status"),
                              ('[{"name": "x", "authority": "a", "expect_status": 200, '
                               '"typo": 1}]', "unknown keys")]:
            status, report, stderr = self.run_client(self.write_spec(text))
            self.assertEqual(status, 2)
            self.assertIsNone(report)
            self.assertIn(message, stderr)

    def test_once_server_exits_after_one_connection(self) -> None:
        port = free_port()
        server = PeerServer(port, self.pki.cert, *self.server_cert, "--once")
        try:
            spec = self.write_spec([{"name": "one", "authority": f"{HOST}:80",
                                     "expect_status": 200, "send": 3,
                                     "expect_reply_json": True}])
            status, _, stderr = self.run_client(spec, port=port)
            self.assertEqual(status, 0, stderr)
            self.assertEqual(server.process.wait(timeout=10), 0)
        finally:
            server.stop()

    def test_server_retires_a_connection_with_goaway(self) -> None:
        port = free_port()
        server = PeerServer(port, self.pki.cert, *self.server_cert, "--goaway-after", "2")
        try:
            spec = self.write_spec([
                {"name": f"stream {index}", "authority": f"{HOST}:80", "expect_status": 200,
                 "send": 10, "expect_reply_json": True}
                for index in range(2)
            ])
            status, report, stderr = self.run_client(spec, port=port, extra=("--await-goaway",
                                                                              "5"))
            assert report is not None, stderr
            self.assertEqual(status, 0, json.dumps(report, indent=2))
            self.assertEqual(self.checks_by_name(report)["goaway"]["detail"],
                             "GOAWAY with NO_ERROR")
        finally:
            server.stop()


# ---------------------------------------------------------------------------------------------
# Waypoint mode
# ---------------------------------------------------------------------------------------------

WAYPOINT_ID = "spiffe://cluster.local/ns/istio-system/sa/waypoint"
FOREIGN_SERVER_ID = "spiffe://other.domain/ns/istio-system/sa/ztunnel"
# Loopback addresses standing for the nodes behind the waypoint.
UPSTREAM_IP = "127.0.0.2"  # `peer.py server`: the destination's ztunnel
FOREIGN_IP = "127.0.0.3"  # `peer.py server` with an identity from another trust domain
SCRIPTED_IP = "127.0.0.4"  # ScriptedUpstream, in this process
SILENT_IP = "127.0.0.5"  # takes TCP connections and never says anything
NOWHERE_IP = "127.0.0.6"  # nothing listens
VIP = "10.96.0.10:80"
DENIED_VIP = "10.96.0.11:80"
NOWHERE_VIP = "10.96.0.12:80"
FOREIGN_VIP = "10.96.0.13:80"
# The waypoint's --timeout: how long a silent upstream keeps a stream waiting for its 503.
WAYPOINT_TIMEOUT = 2.0
# How much ScriptedUpstream.EARLY_END sends: more than one 4 MiB stream window.
EARLY_BODY = 5 * 1024 * 1024


class ScriptedUpstream:
    """An HBONE server in this process, for what `peer.py server` never does. It behaves by
    the port of the CONNECT authority:

    EARLY_END  answers 200, sends EARLY_BODY pattern bytes ("early" seed) and END_STREAM at
               once, then reads the stream to the other side's END_STREAM;
    HOLD       answers 200 and waits (for a reset);
    RESET      answers 200 and resets the stream (ENHANCE_YOUR_CALM) on the first DATA.

    Each connection's outcome (one stream each, as the waypoint dials) goes to `outcomes`.
    """

    EARLY_END, HOLD, RESET = 1001, 1002, 1003

    def __init__(self, address: tuple[str, int], ca: Path, cert: tuple[Path, Path]) -> None:
        self.context = peer.tls_context("server", str(ca), str(cert[0]), str(cert[1]))
        self.listener = socket.create_server(address)
        self.outcomes: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def next_outcome(self, port: int) -> dict[str, Any]:
        """The outcome of the next connection whose stream went to `port` (5 s at most)."""
        deadline = time.monotonic() + 5
        while True:
            outcome = self.outcomes.get(timeout=max(deadline - time.monotonic(), 0.01))
            if outcome["port"] == port:
                return outcome

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return  # Closed.
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        outcome: dict[str, Any] = {"port": None, "headers": {}, "bytes": 0, "ended": False,
                                   "reset_received": None, "reset_sent": False, "error": None}
        digest = hashlib.sha256()
        try:
            with raw:
                raw.settimeout(5)
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    self._converse(tls, outcome, digest)
        except Exception as error:  # Reported through the outcome, checked by the test.
            outcome["error"] = repr(error)
        outcome["sha256"] = digest.hexdigest()
        self.outcomes.put(outcome)

    def _converse(self, tls: Any, outcome: dict[str, Any], digest: Any) -> None:
        connection = peer.new_h2_connection(client_side=False, settings=peer.SERVER_SETTINGS)
        # Body bytes waiting for flow-control window: (stream ID, bytes left) once answered.
        pending: list[Any] = []
        while not (outcome["ended"] or outcome["reset_received"] or outcome["reset_sent"]):
            if pending:
                stream_id, left = pending
                moved = peer.send_within_window(connection, stream_id, left)
                if moved and not left:
                    connection.end_stream(stream_id)
                    pending.clear()
            tls.sendall(connection.data_to_send())
            data = tls.recv(65536)
            if not data:
                outcome["error"] = "the connection closed before the stream ended"
                return
            for event in connection.receive_data(data):
                self._handle(connection, event, outcome, digest, pending)
        tls.sendall(connection.data_to_send())

    def _handle(self, connection: H2Connection, event: Event, outcome: dict[str, Any],
                digest: Any, pending: list[Any]) -> None:
        if isinstance(event, RequestReceived):
            pseudo, headers = peer.split_headers(event.headers)
            outcome["authority"] = pseudo.get(":authority", "")
            outcome["port"] = int(outcome["authority"].rsplit(":", 1)[1])
            outcome["headers"] = headers
            connection.send_headers(event.stream_id, [(":status", "200")])
            if outcome["port"] == self.EARLY_END:
                body = bytearray(peer.PatternBytes("early").read(EARLY_BODY))
                pending[:] = [event.stream_id, body]
        elif isinstance(event, DataReceived):
            connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            digest.update(event.data)
            outcome["bytes"] += len(event.data)
            if outcome["port"] == self.RESET:
                connection.reset_stream(event.stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
                outcome["reset_sent"] = True
        elif isinstance(event, StreamEnded):
            outcome["ended"] = True
            # Ended before our body was all sent: only possible if the relay misbehaved.
            outcome["ended_before_body_sent"] = bool(pending)
        elif isinstance(event, StreamReset):
            outcome["reset_received"] = ErrorCodes(event.error_code).name


def received_bytes(check: dict[str, Any]) -> int:
    """The byte count in a client check's detail ("... received N bytes ...")."""
    match = re.search(r"received (\d+) bytes", check["detail"])
    assert match is not None, check["detail"]
    return int(match.group(1))


class WaypointSelfTest(unittest.TestCase):
    """client -> waypoint -> server (or a scripted upstream), all on loopback."""

    tmp: tempfile.TemporaryDirectory[str]
    pki: Pki
    hbone_port: int
    waypoint_port: int
    server: PeerServer
    foreign: PeerServer
    waypoint: PeerListener
    scripted: ScriptedUpstream
    silent: socket.socket
    client_cert: tuple[Path, Path]
    spec_count = 0

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory(prefix="hbone-waypoint-")
        directory = Path(cls.tmp.name)
        cls.pki = Pki(directory, "mesh")
        server_cert = cls.pki.leaf("server", SERVER_ID)
        cls.client_cert = cls.pki.leaf("client", CLIENT_ID)
        waypoint_cert = cls.pki.leaf("waypoint", WAYPOINT_ID)
        foreign_cert = cls.pki.leaf("foreign-server", FOREIGN_SERVER_ID)
        # Every upstream node listens on the same HBONE port, as real nodes use 15008.
        cls.hbone_port = free_port()
        cls.waypoint_port = free_port()
        cls.server = PeerServer(cls.hbone_port, cls.pki.cert, *server_cert,
                                "--deny-port", "9999", host=UPSTREAM_IP)
        cls.foreign = PeerServer(cls.hbone_port, cls.pki.cert, *foreign_cert, host=FOREIGN_IP)
        cls.scripted = ScriptedUpstream((SCRIPTED_IP, cls.hbone_port), cls.pki.cert,
                                        server_cert)
        cls.silent = socket.create_server((SILENT_IP, cls.hbone_port))
        cls.waypoint = PeerListener(
            "waypoint", f"{HOST}:{cls.waypoint_port}", cls.pki.cert, *waypoint_cert,
            "--timeout", str(WAYPOINT_TIMEOUT),
            "--upstream-hbone-port", str(cls.hbone_port),
            "--route", f"{VIP}={UPSTREAM_IP}:8080",
            "--route", f"{DENIED_VIP}={UPSTREAM_IP}:9999",
            "--route", f"{NOWHERE_VIP}={NOWHERE_IP}:80",
            "--route", f"{FOREIGN_VIP}={FOREIGN_IP}:8080",
        )

    @classmethod
    def tearDownClass(cls) -> None:
        cls.waypoint.stop()
        cls.server.stop()
        cls.foreign.stop()
        cls.scripted.close()
        cls.silent.close()
        cls.tmp.cleanup()

    def tearDown(self) -> None:
        # A bug in the waypoint shows as an internal error it survived: none may have happened.
        problems = [line for line in self.waypoint.stderr
                    if "internal error" in line or "Traceback" in line]
        self.assertEqual(problems, [], "".join(self.waypoint.stderr))

    # -- helpers -------------------------------------------------------------------------------

    def run_client(self, checks: list[dict[str, Any]]) -> tuple[int, dict[str, Any], str]:
        """Runs `peer.py client` against the waypoint; returns (status, report, stderr)."""
        WaypointSelfTest.spec_count += 1
        spec = Path(self.tmp.name) / f"spec-{WaypointSelfTest.spec_count}.json"
        spec.write_text(json.dumps(checks))
        cert, key = self.client_cert
        completed = subprocess.run(
            [sys.executable, str(PEER), "client", "--connect", f"{HOST}:{self.waypoint_port}",
             "--ca", str(self.pki.cert), "--cert", str(cert), "--key", str(key),
             "--expect-identity", WAYPOINT_ID, "--check", str(spec), "--timeout", "10"],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
        )
        self.assertNotIn("Traceback", completed.stderr)
        self.assertTrue(completed.stdout.strip(), completed.stderr)
        return completed.returncode, json.loads(completed.stdout), completed.stderr

    def session(self) -> peer.ClientSession:
        """An HBONE connection to the waypoint, driven from this process."""
        cert, key = self.client_cert
        context = peer.tls_context("client", str(self.pki.cert), str(cert), str(key))
        raw = socket.create_connection((HOST, self.waypoint_port), timeout=5)
        self.addCleanup(raw.close)
        tls = context.wrap_socket(raw, server_hostname=None)
        self.addCleanup(tls.close)
        session = peer.ClientSession(tls, 10)
        session.handshake()
        return session

    @staticmethod
    def open(session: peer.ClientSession, authority: str,
             forwarded_for: str) -> peer.ResponseState:
        check = peer.Check("any", "CONNECT", authority, 200, None, False, {})
        return session.open_stream(peer.request_headers(check, forwarded_for))

    def waypoint_record(self, forwarded_for: str) -> dict[str, Any]:
        """The waypoint's line for the one stream whose client said `forwarded_for`."""
        found = self.waypoint.wait_for_records(
            lambda record: record["forwarded_for"] == forwarded_for)
        self.assertEqual(len(found), 1, f"{found}\n{self.waypoint.stderr}")
        return found[0]

    # -- tests ---------------------------------------------------------------------------------

    def test_relays_through_two_hops(self) -> None:
        # The server answers only after the stream's END_STREAM and the client's checks need
        # the answer's END_STREAM: every echo proves a half-close passed on both ways.
        trace = "0af7651916cd43dd8448eb211c80319c"
        baggage = "k8s.cluster.name=lab,k8s.namespace.name=default,service.name=sleep"
        checks = [
            {"name": "vip", "authority": VIP, "expect_status": 200, "send": 1000,
             "expect_reply_json": True,
             "headers": {"forwarded": 'for="10.1.2.3:4567"', "baggage": baggage,
                         "traceparent": f"00-{trace}-b7ad6b7169203331-01"}},
            # More than the 4 MiB stream window on both connections.
            {"name": "large", "authority": VIP, "expect_status": 200,
             "send": 6 * 1024 * 1024, "expect_reply_json": True,
             "headers": {"forwarded": 'for="10.1.2.3:4568"'}},
            {"name": "empty", "authority": VIP, "expect_status": 200, "send": 0,
             "expect_reply_json": True, "headers": {"forwarded": 'for="10.1.2.3:4569"'}},
            # No --route: the authority is its own upstream.
            {"name": "unrouted", "authority": f"{UPSTREAM_IP}:7070", "expect_status": 200,
             "send": 10, "expect_reply_json": True,
             "headers": {"forwarded": 'for="10.1.2.3:4570"'}},
        ]
        status, report, stderr = self.run_client(checks)
        self.assertEqual(status, 0, f"{json.dumps(report, indent=2)}\n{stderr}")
        self.assertEqual(report["server_identity"], WAYPOINT_ID)
        self.assertEqual(report["tls_version"], "TLSv1.3")
        results = {check["name"]: check for check in report["checks"]}
        self.assertTrue(results["server_settings"]["ok"])  # ztunnel's SETTINGS and window

        # What the server (behind the waypoint) saw and replied.
        reply = results["vip"]["reply"]
        self.assertEqual(reply["local"], f"{UPSTREAM_IP}:8080")
        self.assertEqual(reply["peer"], "10.1.2.3:4567")
        self.assertEqual(reply["client_identity"], WAYPOINT_ID)
        self.assertEqual(reply["headers"]["forwarded"], 'for="10.1.2.3:4567"')
        self.assertEqual(reply["headers"]["baggage"], baggage)
        # The same trace continues with a new parent span.
        self.assertRegex(reply["headers"]["traceparent"], rf"^00-{trace}-[0-9a-f]{{16}}-01$")
        self.assertNotEqual(reply["headers"]["traceparent"].split("-")[2], "b7ad6b7169203331")
        self.assertEqual(results["large"]["reply"]["bytes"], 6 * 1024 * 1024)
        self.assertEqual(results["empty"]["reply"]["bytes"], 0)
        self.assertEqual(results["unrouted"]["reply"]["local"], f"{UPSTREAM_IP}:7070")

        # The waypoint's lines.
        record = self.waypoint_record("10.1.2.3:4567")
        self.assertEqual(record["event"], "stream")
        self.assertEqual(record["authority"], VIP)
        self.assertEqual(record["upstream"], f"{UPSTREAM_IP}:8080")
        self.assertEqual(record["client_identity"], CLIENT_ID)
        self.assertEqual(record["upstream_identity"], SERVER_ID)
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["reason"], "relayed")
        self.assertEqual(record["bytes_up"], 1000)
        self.assertEqual(record["bytes_down"], received_bytes(results["vip"]))
        large = self.waypoint_record("10.1.2.3:4568")
        self.assertEqual(large["bytes_up"], 6 * 1024 * 1024)
        self.assertEqual(large["reason"], "relayed")
        unrouted = self.waypoint_record("10.1.2.3:4570")
        self.assertEqual((unrouted["authority"], unrouted["upstream"]),
                         (f"{UPSTREAM_IP}:7070", f"{UPSTREAM_IP}:7070"))

        # The server's line: it was the waypoint that connected, for the original client.
        found = self.server.wait_for_records(
            lambda r: r.get("peer") == "10.1.2.3:4567" and r["reason"] == "replied")
        self.assertEqual(len(found), 1)
        self.assertEqual(found[0]["client_identity"], WAYPOINT_ID)
        self.assertEqual(found[0]["authority"], f"{UPSTREAM_IP}:8080")
        self.assertEqual(found[0]["bytes"], 1000)

    def test_upstream_refusals_are_passed_on(self) -> None:
        checks = [
            {"name": "denied", "authority": DENIED_VIP, "expect_status": 401,
             "headers": {"forwarded": 'for="10.2.0.1:1"'}},
            {"name": "unreachable", "authority": NOWHERE_VIP, "expect_status": 503,
             "headers": {"forwarded": 'for="10.2.0.2:1"'}},
            {"name": "foreign upstream", "authority": FOREIGN_VIP, "expect_status": 503,
             "headers": {"forwarded": 'for="10.2.0.3:1"'}},
            # The server's own 503 for a proxy port comes back as such.
            {"name": "proxy port", "authority": f"{UPSTREAM_IP}:15001", "expect_status": 503,
             "headers": {"forwarded": 'for="10.2.0.4:1"'}},
        ]
        status, report, stderr = self.run_client(checks)
        self.assertEqual(status, 0, f"{json.dumps(report, indent=2)}\n{stderr}")

        denied = self.waypoint_record("10.2.0.1:1")
        self.assertEqual(denied["status"], 401)
        self.assertEqual(denied["upstream"], f"{UPSTREAM_IP}:9999")
        self.assertEqual(denied["upstream_identity"], SERVER_ID)
        self.assertIn("answered 401", denied["reason"])
        self.assertEqual((denied["bytes_up"], denied["bytes_down"]), (0, 0))
        found = self.server.wait_for_records(
            lambda r: r["authority"] == f"{UPSTREAM_IP}:9999" and r["status"] == 401)
        self.assertTrue(found)
        self.assertEqual(found[0]["client_identity"], WAYPOINT_ID)

        unreachable = self.waypoint_record("10.2.0.2:1")
        self.assertEqual(unreachable["status"], 503)
        self.assertIn(f"cannot connect to {NOWHERE_IP}:{self.hbone_port}",
                      unreachable["reason"])
        foreign = self.waypoint_record("10.2.0.3:1")
        self.assertEqual(foreign["status"], 503)
        self.assertIn("not in trust domain cluster.local", foreign["reason"])
        self.assertEqual(foreign["upstream_identity"], FOREIGN_SERVER_ID)
        proxy = self.waypoint_record("10.2.0.4:1")
        self.assertIn("answered 503", proxy["reason"])

        # Each refusal is also explained on stderr.
        refusals = [line for line in self.waypoint.stderr if "upstream refused" in line]
        self.assertTrue(all(line.startswith("peer.py waypoint: ") for line in refusals))
        self.assertTrue(any("answered 401; answering 401" in line for line in refusals))

    def test_bad_requests_are_refused(self) -> None:
        checks = [
            {"name": "get", "method": "GET", "authority": VIP, "expect_status": 400,
             "headers": {"forwarded": 'for="10.3.0.1:1"'}},
            {"name": "no port", "authority": "10.96.0.10", "expect_status": 400,
             "headers": {"forwarded": 'for="10.3.0.2:1"'}},
            {"name": "no traceparent", "authority": VIP, "expect_status": 400,
             "headers": {"forwarded": 'for="10.3.0.3:1"', "traceparent": None}},
            {"name": "bad baggage", "authority": VIP, "expect_status": 400,
             "headers": {"forwarded": 'for="10.3.0.4:1"', "baggage": "no-equals-sign"}},
            {"name": "no forwarded", "authority": VIP, "expect_status": 400,
             "headers": {"forwarded": None}},
            {"name": "forwarded without port", "authority": VIP, "expect_status": 400,
             "headers": {"forwarded": 'for="10.3.0.6"'}},
        ]
        status, report, stderr = self.run_client(checks)
        self.assertEqual(status, 0, f"{json.dumps(report, indent=2)}\n{stderr}")
        found = self.waypoint.wait_for_records(
            lambda r: r["status"] == 400 and r["client"].startswith(f"{HOST}:"), count=6)
        reasons = " | ".join(record["reason"] for record in found)
        for expected in ("method GET is not CONNECT", "has no port",
                         "missing header 'traceparent'", "baggage", "missing header 'forwarded'",
                         "has no for="):
            self.assertIn(expected, reasons)
        self.assertTrue(all(record["upstream"] is None for record in found))

    def test_upstream_half_closes_first(self) -> None:
        session = self.session()
        stream = self.open(session, f"{SCRIPTED_IP}:{ScriptedUpstream.EARLY_END}",
                           "10.4.0.1:1")
        # The upstream's whole body and END_STREAM arrive before the client sent anything.
        session.wait_for(lambda: stream.finished, "the upstream's early END_STREAM")
        self.assertEqual(stream.status, 200)
        self.assertTrue(stream.ended)
        self.assertIsNone(stream.reset_code)
        self.assertEqual(stream.body_length, EARLY_BODY)
        self.assertEqual(bytes(stream.body),
                         peer.PatternBytes("early").read(len(stream.body)))
        # The other direction stays open: the client's bytes and END_STREAM still get there.
        digest = session.send_body(stream, 300_000, peer.PatternBytes("late"))
        outcome = self.scripted.next_outcome(ScriptedUpstream.EARLY_END)
        self.assertIsNone(outcome["error"])
        self.assertTrue(outcome["ended"])
        self.assertFalse(outcome["ended_before_body_sent"])
        self.assertEqual((outcome["bytes"], outcome["sha256"]), (300_000, digest))
        self.assertEqual(outcome["headers"]["forwarded"], 'for="10.4.0.1:1"')
        record = self.waypoint_record("10.4.0.1:1")
        self.assertEqual(record["reason"], "relayed")
        self.assertEqual((record["bytes_up"], record["bytes_down"]), (300_000, EARLY_BODY))
        self.assertEqual(record["upstream_identity"], SERVER_ID)

    def test_client_reset_reaches_upstream(self) -> None:
        session = self.session()
        stream = self.open(session, f"{SCRIPTED_IP}:{ScriptedUpstream.HOLD}", "10.5.0.1:1")
        session.wait_for(lambda: stream.status is not None, "the response")
        self.assertEqual(stream.status, 200)
        session.cancel(stream)
        outcome = self.scripted.next_outcome(ScriptedUpstream.HOLD)
        self.assertEqual(outcome["reset_received"], "CANCEL")
        self.assertEqual(self.waypoint_record("10.5.0.1:1")["reason"],
                         "reset by the client (CANCEL)")

    def test_upstream_reset_reaches_client(self) -> None:
        session = self.session()
        stream = self.open(session, f"{SCRIPTED_IP}:{ScriptedUpstream.RESET}", "10.5.0.2:1")
        session.wait_for(lambda: stream.status is not None, "the response")
        self.assertEqual(stream.status, 200)
        session.connection.send_data(stream.stream_id, b"trigger")
        session.flush()
        session.wait_for(lambda: stream.finished, "the reset")
        self.assertFalse(stream.ended)
        self.assertEqual(stream.reset_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.scripted.next_outcome(ScriptedUpstream.RESET)["reset_sent"])
        self.assertEqual(self.waypoint_record("10.5.0.2:1")["reason"],
                         "reset by the upstream (ENHANCE_YOUR_CALM)")

    def test_streams_of_one_connection_run_concurrently(self) -> None:
        session = self.session()
        started = time.monotonic()
        # Its upstream accepts TCP and never answers TLS: it waits for --timeout, then 503.
        stalled = self.open(session, f"{SILENT_IP}:80", "10.6.0.1:1")
        quick = self.open(session, VIP, "10.6.0.2:1")
        session.wait_for(lambda: quick.status is not None, "the quick stream's response")
        self.assertEqual(quick.status, 200)
        digest = session.send_body(quick, 50_000, peer.PatternBytes("quick"))
        session.wait_for(lambda: quick.finished, "the quick stream's reply")
        self.assertIsNone(stalled.status, "the stalled stream held up the quick one")
        self.assertLess(time.monotonic() - started, WAYPOINT_TIMEOUT)
        reply = json.loads(bytes(quick.body).split(b"\n", 1)[0])
        self.assertEqual((reply["bytes"], reply["sha256"]), (50_000, digest))
        session.wait_for(lambda: stalled.status is not None or stalled.finished,
                         "the stalled stream's response")
        self.assertEqual(stalled.status, 503)
        self.assertTrue(stalled.ended)
        self.assertGreaterEqual(time.monotonic() - started, WAYPOINT_TIMEOUT * 0.9)
        record = self.waypoint_record("10.6.0.1:1")
        self.assertEqual(record["status"], 503)
        self.assertIn("timed out", record["reason"])

    def test_bad_options_are_usage_errors(self) -> None:
        cert, key = self.client_cert
        base = [sys.executable, str(PEER), "waypoint", "--listen", f"{HOST}:0",
                "--ca", str(self.pki.cert), "--cert", str(cert), "--key", str(key),
                "--expect-client-trust-domain", "cluster.local"]
        for extra, message in [(["--route", "10.0.0.1:80"], "AUTHORITY=IP:PORT"),
                               (["--route", "10.0.0.1=10.0.0.2:80"], "has no port"),
                               (["--route", "10.0.0.1:80=10.0.0.2:80",
                                 "--route", "10.0.0.1:80=10.0.0.3:80"], "given twice"),
                               (["--upstream-hbone-port", "0"], "not a port")]:
            completed = subprocess.run(base + extra, capture_output=True, text=True,
                                       timeout=PROCESS_TIMEOUT)
            self.assertEqual(completed.returncode, 2, completed.stderr)
            self.assertIn(message, completed.stderr)
            self.assertEqual(completed.stdout, "")



# ---------------------------------------------------------------------------------------------

GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"
APP_IP = "127.0.0.7"  # a plain TCP app behind the gateway


class TcpApp:
    """A plain TCP server: reads each connection to its end, then answers one JSON line with
    the byte count and SHA-256, as `peer.py server` answers a stream."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.listener = socket.create_server(address)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn:
            digest, count = hashlib.sha256(), 0
            while data := conn.recv(65536):
                digest.update(data)
                count += len(data)
            reply = {"bytes": count, "sha256": digest.hexdigest()}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()


class GatewaySelfTest(unittest.TestCase):
    """client -> gateway -> a plain TCP app: the stream's bytes pass unchanged both ways, with
    END_STREAM as the app's EOF and the app's close as END_STREAM."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory(prefix="hbone-gateway-")
        cls.pki = Pki(Path(cls.tmp.name), "mesh")
        cls.client_cert = cls.pki.leaf("client", CLIENT_ID)
        cls.app_port = free_port()
        cls.app = TcpApp((APP_IP, cls.app_port))
        cls.gateway_port = free_port()
        cls.gateway = PeerListener("gateway", f"{HOST}:{cls.gateway_port}", cls.pki.cert,
                                   *cls.pki.leaf("gateway", GATEWAY_ID))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.gateway.stop()
        cls.app.close()
        cls.tmp.cleanup()

    def run_client(self, checks: list[dict[str, Any]]) -> dict[str, Any]:
        spec = Path(self.tmp.name) / "spec.json"
        spec.write_text(json.dumps(checks))
        cert, key = self.client_cert
        completed = subprocess.run(
            [sys.executable, str(PEER), "client", "--connect", f"{HOST}:{self.gateway_port}",
             "--ca", str(self.pki.cert), "--cert", str(cert), "--key", str(key),
             "--expect-identity", GATEWAY_ID, "--check", str(spec), "--timeout", "10"],
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
        self.assertNotIn("Traceback", completed.stderr + "".join(self.gateway.stderr))
        return {check["name"]: check for check in json.loads(completed.stdout)["checks"]}

    def test_relays_bytes_to_a_tcp_upstream_and_back(self) -> None:
        app = f"{APP_IP}:{self.app_port}"
        nowhere = f"{NOWHERE_IP}:{self.app_port}"
        checks = self.run_client([
            {"name": "app", "authority": app, "expect_status": 200, "send": 300_000,
             "expect_reply_json": True},
            {"name": "nowhere", "authority": nowhere, "expect_status": 503},
        ])
        self.assertTrue(checks["app"]["ok"], checks["app"])
        self.assertTrue(checks["nowhere"]["ok"], checks["nowhere"])
        relaying = self.gateway.wait_for_records(lambda r: r["event"] == "relaying", count=2)
        self.assertEqual({r["authority"] for r in relaying}, {app, nowhere})
        self.assertTrue(all(r["client_identity"] == CLIENT_ID for r in relaying))
        done = self.gateway.wait_for_records(
            lambda r: r["event"] == "stream" and r["authority"] == app)
        self.assertEqual(len(done), 1, done)
        self.assertEqual(done[0]["bytes_up"], 300_000)
        self.assertEqual(done[0]["reason"], "relayed")


if __name__ == "__main__":
    unittest.main()
