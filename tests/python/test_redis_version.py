"""The real `mas serve`, pointed at a Redis too old for its scripts, must refuse to start and
say why, instead of starting and failing request by request (`XADD 0-*` and `PEXPIRE NX`
arrived in Redis 7.0).

The "old Redis" is a few lines of RESP here: it answers `PING`, `CLIENT SETINFO` and
`INFO server` as Redis 6.2.6 does, and nothing else.
"""

from __future__ import annotations

import socket
import threading

import pytest

from harness import Broker


class OldRedis:
    """A loopback server that speaks just enough RESP to claim to be Redis 6.2.6."""

    VERSION = "6.2.6"

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.commands: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffered = b""
        with conn:
            while chunk := conn.recv(65536):
                buffered += chunk
                while (parsed := self._command(buffered)) is not None:
                    args, buffered = parsed
                    conn.sendall(self._answer(args))

    @staticmethod
    def _command(data: bytes) -> tuple[list[bytes], bytes] | None:
        """One RESP array of bulk strings from the front of `data`, or None if incomplete."""
        try:
            head, rest = data.split(b"\r\n", 1)
            args = []
            for _ in range(int(head[1:])):
                length, rest = rest.split(b"\r\n", 1)
                size = int(length[1:])
                if len(rest) < size + 2:
                    return None
                args.append(rest[:size])
                rest = rest[size + 2:]
            return args, rest
        except ValueError:
            return None

    def _answer(self, args: list[bytes]) -> bytes:
        name = args[0].upper()
        self.commands.append(name)
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"INFO":
            body = f"# Server\r\nredis_version:{self.VERSION}\r\nredis_mode:standalone\r\n".encode()
            return b"$%d\r\n%s\r\n" % (len(body), body)
        if name == b"CLIENT":
            return b"+OK\r\n"
        return b"-ERR unknown command\r\n"

    def close(self) -> None:
        self.listener.close()


def test_the_broker_refuses_to_start_on_a_redis_older_than_7_0_and_names_its_version(pki, tmp_path):
    old = OldRedis()
    try:
        with pytest.raises(RuntimeError) as refused:
            Broker.start(tmp_path, pki, redis_url=old.url)
    finally:
        old.close()
    message = str(refused.value)
    assert f"Redis {OldRedis.VERSION} is too old: mas needs 7.0 or newer" in message, message
    assert b"INFO" in old.commands, "the broker asked the server its version"
    assert not any(c in old.commands for c in (b"EVALSHA", b"SETNX")), "nothing was written first"
