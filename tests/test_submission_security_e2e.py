"""Submission security against the real ``outboundd`` process.

The AUTH throttle shared by every SMTP node, credentials absent from the
log at its most verbose level, hostile lines (over-long, control
characters), the exact line limit, and IPv6 ``[::1]`` listeners.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import signal
import sys
from pathlib import Path

import pytest

from outboundd.plugins.auth_flat_file import hash_password
from tests import certs
from tests.harness import free_port, running, write_config
from tests.submission_fixtures import LineClient

MX_PORT = 9  # nothing is delivered in these tests


def _bad_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "Traceback" in line or "level=ERROR" in line]


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def users_file(password: str) -> str:
    return f"[users]\nalice = {hash_password(password)}\n"


# --------------------------------------------------------------------------
# Which process holds a connection


def _socket_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the server-side socket of a loopback IPv4 connection."""
    want_local = f"0100007F:{server_port:04X}"
    want_remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_remote:
            return int(fields[9])
    return None


def _owner(pids: list[int], inode: int) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            names = os.listdir(fd_dir)
        except FileNotFoundError:
            continue
        for name in names:
            try:
                if os.readlink(fd_dir / name) == target:
                    return pid
            except OSError:
                continue
    return None


async def serving_pid(pids: list[int], server_port: int, client: LineClient) -> int:
    """The PID of the process that accepted ``client``'s connection."""
    client_port = client.writer.get_extra_info("sockname")[1]
    for _ in range(100):
        inode = _socket_inode(server_port, client_port)
        if inode is not None and (pid := _owner(pids, inode)) is not None:
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError("no process holds the connection")


# --------------------------------------------------------------------------
# Item 1: the count is shared by every SMTP node


async def test_the_auth_throttle_is_shared_by_smtp_nodes(tmp_path: Path) -> None:
    """nodes=2: failures in either process count together; auth_max_failures=0 starts."""
    password = "right-" + secrets.token_hex(8)
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=MX_PORT, plugins=["auth_flat_file"],
        outbound={"delivery_processes": 0},
        smtp={"nodes": 2, "auth_max_failures": 0, "auth_failure_delay": 0,
              "auth_disconnect_after": 4, "auth_block_seconds": 60},
        extra_files={"auth_flat_file.ini": users_file(password)},
    )  # fmt: skip
    async with running(config) as d:
        # "accepting", not "started": a node still importing when its peer is
        # stopped would leave the steered connections waiting on it.
        await d.wait_for(r"SMTP node accepting")
        assert d.proc is not None
        pids = [d.proc.pid, *d.children()]
        clients: list[LineClient] = []
        groups: list[list[LineClient]] = []
        try:
            # Steer connections: while one process is stopped, the other accepts.
            # Only EHLO happens meanwhile; all AUTH runs with both processes live.
            for stopped in pids:
                os.kill(stopped, signal.SIGSTOP)
                try:
                    group = [await LineClient.connect(d.smtp_port) for _ in range(3)]
                    clients += group
                    for client in group:
                        await client.cmd("EHLO client.test")
                finally:
                    os.kill(stopped, signal.SIGCONT)
                groups.append(group)
            first, second = groups
            owners = {await serving_pid(pids, d.smtp_port, c) for c in first}
            owners2 = {await serving_pid(pids, d.smtp_port, c) for c in second}
            assert len(owners) == len(owners2) == 1 and owners != owners2
            # Two failures in each process: in memory each would count two.
            for client in (first[0], second[0], first[1]):
                reply = await client.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}")
                assert reply.startswith("535 5.7.8"), reply
            reply = await second[1].cmd(f"AUTH PLAIN {plain('alice', 'wrong')}")
            assert reply.startswith("421 4.7.0"), reply  # the 4th failure of one client
            for client in (first[2], second[2]):  # the right password, either process
                reply = await client.cmd(f"AUTH PLAIN {plain('alice', password)}")
                assert reply.startswith("421 4.7.0"), reply
        finally:
            for client in clients:
                await client.close()
        assert d.query("SELECT client, failures FROM auth_throttle") == [("127.0.0.1", 4)]
    assert d.returncode == 0
    assert not [line for line in d.lines if "Traceback" in line or "level=ERROR" in line]


# --------------------------------------------------------------------------
# Item 2: no credential in the log, at the most verbose level


async def test_no_auth_path_logs_a_credential_at_level_data(tmp_path: Path) -> None:
    password = "Pw-" + secrets.token_hex(12)
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=MX_PORT, plugins=["auth_flat_file"],
        outbound={"delivery_processes": 0},
        smtp={"auth_disconnect_after": 1000, "auth_failure_delay": 0},
        extra_files={"auth_flat_file.ini": users_file(password),
                     "log.ini": "[main]\nlevel=data\nformat=logfmt\n"},
    )  # fmt: skip
    # (commands, expected reply prefix of each) per connection
    sessions: list[list[tuple[str, str]]] = [
        [(f"AUTH PLAIN {plain('alice', password)}", "235")],  # PLAIN inline
        [("AUTH PLAIN", "334"), (plain("alice", password), "235")],  # PLAIN prompt
        [("AUTH LOGIN", "334"), (b64("alice"), "334"), (b64(password), "235")],  # LOGIN
        [(f"AUTH LOGIN {b64('alice')}", "334"), (b64(password), "235")],  # LOGIN inline
        [(f"AUTH PLAIN {plain('alice', password + 'x')}", "535")],  # wrong password
        [("AUTH LOGIN", "334"), (b64("alice"), "334"), (password, "501 5.5.2")],  # raw
        [("AUTH PLAIN", "334"), (password, "501 5.5.2")],  # raw at the PLAIN prompt
        [("AUTH LOGIN", "334"), (password, "501 5.5.2")],  # raw as the user name
        [("AUTH LOGIN", "334"), (b64("alice"), "334"), ("*", "501 5.7.0")],  # cancel
        [("AUTH PLAIN", "334"), ("*", "501 5.7.0")],
        [(f"AUTH PLAIN {password}", "501 5.5.2")],  # raw inline
        [(password, "500 5.5.2"), (b64(password), "500 5.5.2")],  # out of step
        [("AUTH LOGIN", "334"), (b64("alice"), "334"), (password * 300, "500 5.5.2")],
    ]
    async with running(config) as d:
        for session in sessions:
            client = await LineClient.connect(d.smtp_port)
            try:
                await client.cmd("EHLO client.test")
                for line, expected in session:
                    reply = await client.cmd(line)
                    assert reply.startswith(expected), (line[:40], reply)
                assert (await client.cmd("NOOP")).startswith("250")  # session still in step
            finally:
                await client.close()
        await d.wait_for(r"AUTH failed")
    log = "\n".join(d.lines)
    assert "AUTH succeeded" in log and ">>" in log  # the protocol lines are there
    forms = {password, b64(password), plain("alice", password), plain("alice", password + "x")}
    forms |= {base64.b64encode(password.encode()).decode()[:16], repr(password.encode())}
    for form in forms:
        assert form not in log, f"{form!r} appears in the log"
    assert "Traceback" not in log and "level=ERROR" not in log, _bad_lines(d.lines)


# --------------------------------------------------------------------------
# Items 21, 22, 24: hostile lines against the real process


async def test_hostile_lines_get_documented_replies_and_no_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=MX_PORT, plugins=["auth_flat_file"],
        outbound={"delivery_processes": 0},
        smtp={"max_line_length": 4096, "auth_disconnect_after": 1000},
        extra_files={"auth_flat_file.ini": users_file("pw-" + secrets.token_hex(4))},
    )  # fmt: skip
    async with running(config) as d:
        client = await LineClient.connect(d.smtp_port)
        try:
            await client.cmd("EHLO client.test")
            # Over-long lines inside AUTH prompts: 500 5.5.2, session in step.
            assert (await client.cmd("AUTH LOGIN")).startswith("334")
            assert (await client.cmd("A" * 5000)).startswith("500 5.5.2")
            assert (await client.cmd("AUTH PLAIN")).startswith("334")
            assert (await client.cmd("B" * 4097)).startswith("500 5.5.2")
            assert (await client.cmd("AUTH PLAIN " + "C" * 5000)).startswith("500 5.5.2")
            assert (await client.cmd("MAIL FROM:<" + "d" * 5000 + "@x.test>")).startswith(
                "500 5.5.2"
            )
            # Control characters and UTF-8 never come back raw.
            for raw in (b"\x1b[31mFOO", b"F\x00O", b"F\x7fO", b"F\rO"):
                reply = await client.cmd(raw)
                assert reply.startswith("500 5.5.2"), reply
                assert re.fullmatch(r"[ -~\n]*", reply), repr(reply)
            reply = await client.cmd("MAIL FROM:<a@x.test> K\u00e9Y=1".encode())
            assert reply[:3] in ("501", "555") and re.fullmatch(r"[ -~]*", reply), repr(reply)
            # Item 23: address literals follow RFC 5321's grammar.
            assert (await client.cmd("MAIL FROM:<a@[IPv6:fe80::1%eth0]>")).startswith("501 5.1.7")
            assert (await client.cmd("MAIL FROM:<a@[192.0.2.1]>")).startswith("250")
            reply = await client.cmd("RCPT TO:<bob@[IPv6:fe80::1%eth0]>")
            assert reply.startswith("501 5.1.3"), reply
            assert (await client.cmd("RCPT TO:<bob@[IPv6:2001:db8::1]>")).startswith("250")
            assert (await client.cmd("RSET")).startswith("250")
            assert (await client.cmd("NOOP")).startswith("250")
        finally:
            await client.close()
    log = "\n".join(d.lines)
    assert "Traceback" not in log and "level=ERROR" not in log, _bad_lines(d.lines)
    assert "SMTP session exception" not in log and "ValueError" not in log


# --------------------------------------------------------------------------
# IPv6 listeners, plain and implicit TLS


def _has_ipv6_loopback() -> bool:
    path = Path("/proc/net/if_inet6")
    return path.exists() and "00000000000000000000000000000001" in path.read_text()


async def test_ipv6_loopback_listeners_plain_and_implicit_tls(tmp_path: Path) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback address ::1")
    pki = certs.make_pki(tmp_path / "pki", "localhost", "::1")
    port, tls_port = free_port(), free_port()
    password = "v6-" + secrets.token_hex(6)
    smtp_ini = (
        f"[main]\nlisten=127.0.0.1:{free_port()}, [::1]:{port}\nlisten_tls=[::1]:{tls_port}\n"
    )
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=MX_PORT, plugins=["auth_flat_file"],
        outbound={"delivery_processes": 0},
        extra_files={"smtp.ini": smtp_ini, "auth_flat_file.ini": users_file(password),
                     "tls_cert.pem": pki.cert_pem.read_text(),
                     "tls_key.pem": pki.key_pem.read_text()},
    )  # fmt: skip
    async with running(config) as d:
        assert any(f"address=[::1]:{port}" in line for line in d.lines)
        assert any(f"address=[::1]:{tls_port}" in line for line in d.lines)
        reader, writer = await asyncio.open_connection("::1", port)
        client = LineClient(reader, writer)
        assert (await client.reply()).startswith("220 ")
        ehlo = await client.cmd("EHLO client.test")
        assert "AUTH PLAIN LOGIN" in ehlo  # ::1 is loopback: AUTH without TLS
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', password)}")).startswith("235")
        assert (await client.cmd("MAIL FROM:<a@x.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<b@dest.test>")).startswith("250")
        await client.close()
        reader, writer = await asyncio.open_connection(
            "::1", tls_port, ssl=pki.client_context(), server_hostname="::1"
        )
        client = LineClient(reader, writer)
        assert (await client.reply()).startswith("220 ")
        ehlo = await client.cmd("EHLO client.test")
        assert "STARTTLS" not in ehlo and "AUTH PLAIN LOGIN" in ehlo
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', password)}")).startswith("235")
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.version().startswith("TLS")
        await client.close()
    assert d.returncode == 0


# --------------------------------------------------------------------------
# listen_tls without a usable key pair


@pytest.mark.parametrize("pair", ["missing", "garbage"])
async def test_listen_tls_without_a_key_pair_is_one_line_and_exit_1(
    tmp_path: Path, pair: str
) -> None:
    files = {
        "smtp.ini": f"[main]\nlisten=127.0.0.1:{free_port()}\nlisten_tls=127.0.0.1:{free_port()}\n"
    }
    if pair == "garbage":
        files |= {"tls_cert.pem": "not a certificate\n", "tls_key.pem": "not a key\n"}
    config = write_config(tmp_path / "config", dns_port=53, mx_port=MX_PORT, extra_files=files)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outboundd", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    lines = (out + err).decode().strip().splitlines()
    assert len(lines) == 1, lines
    key = "listen_tls" if pair == "missing" else "cert"
    assert "smtp.ini" in lines[0] or "tls.ini" in lines[0]
    assert f" {key}: " in lines[0] and "Traceback" not in lines[0]
