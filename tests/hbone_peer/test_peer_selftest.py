"""Self-test of the HBONE peer: its server mode and client mode against each other.

Run from the repository root:  python3 -m unittest tests/hbone_peer/test_peer_selftest.py

It makes throwaway certificates with the `openssl` command line (an ECDSA P-256 root CA and
leaves carrying SPIFFE URI SANs) and only uses 127.0.0.1.
"""

from __future__ import annotations

import json
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
from typing import Any

PEER = Path(__file__).resolve().parent / "peer.py"
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


class PeerServer:
    """`peer.py server` in the background, its stdout lines collected."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PEER), "server", "--listen", f"{HOST}:{port}",
             "--ca", str(ca), "--cert", str(cert), "--key", str(key),
             "--expect-client-trust-domain", "cluster.local", "--timeout", "5", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        first = self.lines.get(timeout=10)
        if first != "ready":
            raise AssertionError(f"the server printed {first!r} instead of 'ready'")

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

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


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
                   identity: str = SERVER_ID, timeout: str = "5"
                   ) -> tuple[int, dict[str, Any] | None, str]:
        """Runs `peer.py client`; returns (exit status, parsed report or None, stderr)."""
        cert_path, key_path = cert or self.client_cert
        completed = subprocess.run(
            [sys.executable, str(PEER), "client", "--connect", f"{HOST}:{port or self.port}",
             "--ca", str(ca or self.pki.cert), "--cert", str(cert_path), "--key", str(key_path),
             "--expect-identity", identity, "--check", str(spec), "--timeout", timeout],
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


if __name__ == "__main__":
    unittest.main()
