"""Processes and certificates for the interop suite.

Everything here is what a user would run: `mas dev-certs` writes the broker's and the agents'
certificates, `mas serve --config` runs the broker, its JSON ready line says where it listens,
SIGTERM stops it. Certificates that `mas dev-certs` never makes (no SAN, two SPIFFE URIs, a
foreign SPIFFE prefix, an untrusted CA) come from a second test CA made with `cryptography`.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

STORES = ("embedded", "redis")

MAS_BIN = os.environ.get("MAS_BIN", "mas")
REDIS_SERVER = os.environ.get("REDIS_SERVER", "redis-server")

# The allowlist of every broker in the suite: who may message whom, and what discovery shows.
AGENTS: dict[str, dict] = {
    # mas.runtime.v1 clients (raw grpcio stubs)
    "alice": {"allowed_targets": ["bob", "carol", "erin"], "capabilities": ["greeter"]},
    "bob": {"allowed_targets": ["alice"], "capabilities": ["echo", "math"], "metadata": {"lang": "py"}},
    "carol": {"allowed_targets": ["alice"], "capabilities": ["math"]},
    "dave": {},  # allowlisted, may message nobody
    "erin": {},  # allowlisted, never connects (an offline target)
    "stately": {},  # state tests
    "rejoin": {"allowed_targets": ["bob"]},  # reconnect tests
    # mas.v1 clients (mas-framework 0.4.5 `mas.Agent`)
    "v1_client": {"allowed_targets": ["v1_worker"], "capabilities": ["v1-client"]},
    "v1_worker": {"allowed_targets": ["v1_client"], "capabilities": ["v1-work"], "metadata": {"gen": "mas.v1"}},
    "v1_state": {},
}

# Agents with dev certificates that the broker does not allowlist.
OUTSIDERS = ("outsider",)
# Operator certificates: `ops` is in the broker's `admin.operators`, `rogue` is not.
OPERATORS = ("ops", "rogue")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, bound_s: float, step: float = 0.05) -> bool:
    """Polls `condition` until it holds (True) or `bound_s` seconds passed (its last value)."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@dataclass(frozen=True)
class Identity:
    """A client's TLS files."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    """`mas dev-certs` output plus the odd certificates of the refusal tests."""

    dir: Path
    client_ca_bundle: Path

    @staticmethod
    def create(dir: Path) -> "Pki":
        agents = ",".join([*AGENTS, *OUTSIDERS])
        operators = ",".join(OPERATORS)
        subprocess.run([MAS_BIN, "dev-certs", "--dir", str(dir), "--agents", agents, "--operators", operators],
                       check=True)
        odd = _OddCertificates(dir)
        odd.write()
        bundle = dir / "client-ca-bundle.pem"
        bundle.write_bytes((dir / "ca.pem").read_bytes() + (dir / "test-ca.pem").read_bytes())
        return Pki(dir, bundle)

    def agent(self, name: str) -> Identity:
        """A `mas dev-certs` agent certificate (or an odd one by its name, see below)."""
        return Identity(self.dir / "ca.pem", self.dir / f"{name}.pem", self.dir / f"{name}.key")

    def operator(self, name: str) -> Identity:
        """A `mas dev-certs --operators` certificate (`spiffe://mas/operator/{name}`)."""
        return Identity(self.dir / "ca.pem", self.dir / "operators" / f"{name}.pem",
                        self.dir / "operators" / f"{name}.key")


class _OddCertificates:
    """Client certificates for identity refusals, signed by a second CA the broker trusts,
    and one signed by a CA it does not trust."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir

    def write(self) -> None:
        trusted = self._ca("mas interop test CA", "test-ca")
        untrusted = self._ca("untrusted CA", "untrusted-ca")
        spiffe = x509.UniformResourceIdentifier
        self._leaf(trusted, "no-san", [])
        self._leaf(trusted, "dns-only", [x509.DNSName("alice.example")])
        self._leaf(trusted, "two-spiffe", [spiffe("spiffe://mas/agent/alice"), spiffe("spiffe://mas/agent/bob")])
        self._leaf(trusted, "foreign-spiffe", [spiffe("spiffe://other/agent/alice")])
        self._leaf(trusted, "bad-id-spiffe", [spiffe("spiffe://mas/agent/al ice")])
        self._leaf(untrusted, "untrusted-alice", [spiffe("spiffe://mas/agent/alice")])

    def _ca(self, name: str, file: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        (self.dir / f"{file}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    def _leaf(self, issuer, name: str, sans: list) -> None:
        ca_cert, ca_key = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (self.dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


class RedisServer:
    """A private redis-server on a free loopback port, stopped by its pid."""

    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, fsync: str | None) -> None:
        self.proc, self.port, self.workdir, self.fsync = proc, port, workdir, fsync
        self.url = f"redis://127.0.0.1:{port}"

    @staticmethod
    def start(workdir: Path, fsync: str | None = None, port: int | None = None) -> "RedisServer":
        """A fresh server; with `fsync` (`everysec` or `always`) it keeps an append-only file in
        `workdir`, from which `restart` recovers."""
        port = port or free_port()
        aof = ["--appendonly", "yes", "--appendfsync", fsync] if fsync else ["--appendonly", "no"]
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return RedisServer(proc, port, workdir, fsync)
            except OSError:
                time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"redis-server did not start on port {port}")

    def kill(self) -> None:
        """kill -9: whatever the append-only file has not fsynced is lost."""
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> "RedisServer":
        """The same port and directory: recovers from the append-only file."""
        return RedisServer.start(self.workdir, self.fsync, self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Broker:
    """`mas serve` as a process: started from a config file, ready when it prints its ready
    line, stopped by a signal."""

    def __init__(self, workdir: Path, config_path: Path, proc: subprocess.Popen, addr: str,
                 admin_addr: str | None = None) -> None:
        self.workdir, self.config_path, self.proc, self.addr = workdir, config_path, proc, addr
        self.admin_addr = admin_addr
        self.log_path = workdir / "broker.log"

    @property
    def target(self) -> str:
        """The address clients dial: the server certificate names `localhost`."""
        return "localhost:" + self.addr.rsplit(":", 1)[1]

    @staticmethod
    def config(pki: Pki, listen_addr: str = "127.0.0.1:0", redis_url: str | None = None) -> dict:
        config = {
            "listen_addr": listen_addr,
            "tls": {
                "server_cert_path": str(pki.dir / "server.pem"),
                "server_key_path": str(pki.dir / "server.key"),
                "client_ca_path": str(pki.client_ca_bundle),
            },
            "agents": AGENTS,
            # The admin listener (metrics, health) on a free port: the ready line names it. Only
            # the first operator may use the admin API; the other is refused.
            "admin": {"listen_addr": "127.0.0.1:0", "operators": [OPERATORS[0]]},
            # Quick retries, so redelivery tests take milliseconds.
            "delivery": {"retry_backoff_initial_ms": 50, "retry_backoff_max_ms": 200},
            # The suite sends far more than the reference's 100 messages a minute.
            "gateway": {"rate_limit": {"per_minute": 1_000_000_000, "per_hour": 1_000_000_000}},
        }
        if redis_url:
            config["redis"] = {"url": redis_url}
        return config

    @classmethod
    def start(cls, workdir: Path, pki: Pki, redis_url: str | None = None, listen_addr: str = "127.0.0.1:0",
              **overrides) -> "Broker":
        config = cls.config(pki, listen_addr, redis_url)
        config["data_dir"] = str(workdir / "data")
        config.update(overrides)
        config_path = workdir / "mas.json"
        config_path.write_text(json.dumps(config, indent=2))
        return cls.launch(workdir, config_path)

    @classmethod
    def launch(cls, workdir: Path, config_path: Path) -> "Broker":
        log = open(workdir / "broker.log", "ab")
        proc = subprocess.Popen(
            [MAS_BIN, "serve", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn,mas_server=info")},
        )
        log.close()
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line, or EOF if it failed to start
        if not line:
            proc.wait(timeout=10)
            raise RuntimeError(f"mas serve exited {proc.returncode}: {(workdir / 'broker.log').read_text()}")
        ready = json.loads(line)
        assert ready["event"] == "mas.broker.ready", ready
        assert ready["pid"] == proc.pid
        return cls(workdir, config_path, proc, ready["listen_addr"], ready.get("admin_addr"))

    def admin_get(self, path: str, timeout: float = 5) -> tuple[int, str, str]:
        """GET `path` on the admin listener: (status, content type, body)."""
        import urllib.error
        import urllib.request
        assert self.admin_addr, "the broker runs without an admin listener"
        try:
            with urllib.request.urlopen(f"http://{self.admin_addr}{path}", timeout=timeout) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read().decode()

    def restart(self) -> "Broker":
        """The same configuration again (a port 0 config gets a new port)."""
        return Broker.launch(self.workdir, self.config_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def kill(self) -> None:
        """kill -9: no drain, no lease release."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
