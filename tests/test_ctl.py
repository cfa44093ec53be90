"""``outboundctl`` as an operator runs it: a real subprocess on a real spool.

Both parts run twice, on a SQLite queue and on a PostgreSQL one (``queue_url``).
The first part fills a spool in ``tmp_path`` through :class:`Spool` itself
(accept, claim, record — the daemon's own calls) and runs every command and
flag against it.  The second part runs the real ``outboundd`` with a loopback
DNS server and scripted MX hosts, for the commands whose point is what the
running daemon does next: ``flush``, ``pause``/``resume`` and ``bounce``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from outboundd import spool as spool_backend
from outboundd.config import load_config
from outboundd.spool import AttemptRecord, NewMessage, NewRecipient, Outcome, Spool
from tests.dnsserver import DNSServer
from tests.harness import free_port, queued_id, run_sql, running, write_config
from tests.mxserver import MXScript, MXServer, mx_server

SENDER = "alice@sender.test"
BODY = (
    b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: quarterly report\r\n"
    b"Message-ID: <q1@sender.test>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nnumbers\r\n"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


async def ctl(config_dir: Path, *args: str, stdin: str | None = None) -> Result:
    """Run ``python -m outboundd.ctl -c CONFIG_DIR ARGS`` and collect everything."""
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outboundd.ctl", "-c", str(config_dir), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else b""), 30
    )
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def send(
    port: int, sender: str, recipients: list[str], *, login: tuple[str, str] | None = None
) -> str:
    """Submit one message to the daemon over loopback (AUTH optional); its queue ID."""
    import aiosmtplib

    body = (
        f"From: <{sender}>\r\nTo: <{recipients[0]}>\r\nSubject: ctl test\r\n\r\nHello.\r\n"
    ).encode()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        if login is not None:
            await client.login(*login)
        await client.mail(sender)
        for rcpt in recipients:
            await client.rcpt(rcpt)
        response = await client.data(body)
    finally:
        with contextlib.suppress(Exception):
            await client.quit()
    assert response.code == 250, response
    return queued_id(response.message)


def assert_failed(result: Result, pattern: str) -> None:
    """Exit 1, nothing on stdout, exactly one line on stderr matching ``pattern``."""
    assert result.code == 1, result
    assert result.out == ""
    assert len(result.err_lines) == 1, result.err
    assert re.search(pattern, result.err_lines[0]), result.err
    assert "Traceback" not in result.err


def assert_usage(result: Result, pattern: str) -> None:
    assert result.code == 2, result
    assert "usage: outboundctl" in result.err
    assert re.search(pattern, result.err), result.err


# ---------------------------------------------------------------- a spool


@dataclass
class Queue:
    config: Path
    db: Path | str  # the SQLite file, or the PostgreSQL queue's URL
    greylisted: str  # bob@dest.test deferred (451), carol@other.test delivered
    nullsender: str  # <> -> x@dest.test, queued
    other: str  # mallory@sender.test -> y@other.test, deferred, received 3h ago

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return run_sql(self.db, sql, params)


async def record(spool: Spool, owner: str, outcomes: dict[str, AttemptRecord]) -> None:
    """Claim everything due and record the given outcome per recipient address."""
    for claim in await spool.claim(owner, limit=100, lease_seconds=60):
        records = []
        for r in claim.recipients:
            template = outcomes[r.address]
            records.append(
                AttemptRecord(
                    recipient_id=r.id,
                    outcome=template.outcome,
                    started_at=template.started_at,
                    finished_at=template.finished_at,
                    mx_host=template.mx_host,
                    mx_ip=template.mx_ip,
                    port=template.port,
                    tls=template.tls,
                    code=template.code,
                    status=template.status,
                    response=template.response,
                    next_attempt_at=template.next_attempt_at,
                )
            )
        await spool.record(owner, claim, records)


@pytest.fixture
async def queue(tmp_path: Path, queue_url: str | None) -> Queue:
    """The same queue in SQLite and (``queue_url``) in PostgreSQL: every command runs on both."""
    config = write_config(
        tmp_path / "config",
        dns_port=free_port(),
        mx_port=free_port(),
        outbound={"queue_url": queue_url} if queue_url else None,
    )
    queue_dir = load_config(config).outbound.queue_dir
    spool = await spool_backend.open(queue_url or queue_dir)
    try:
        rcpts = [NewRecipient("bob@dest.test"), NewRecipient("carol@other.test")]
        first = await spool.accept(NewMessage(SENDER, rcpts, BODY, auth_user="alice"))
        second = await spool.accept(NewMessage("", [NewRecipient("x@dest.test")], BODY))
        third = await spool.accept(
            NewMessage("mallory@sender.test", [NewRecipient("y@other.test")], BODY)
        )
        now = time.time()
        later = now + 3600
        common = {"started_at": now - 0.2, "finished_at": now, "port": 25}
        mx_dest = {"mx_host": "mx.dest.test", "mx_ip": "127.0.0.2"}
        mx_other = {"mx_host": "mx.other.test", "mx_ip": "127.0.0.3", "tls": "TLSv1.3"}
        await record(
            spool,
            "test-owner",
            {
                "bob@dest.test": AttemptRecord(
                    0, Outcome.DEFERRED, **common, **mx_dest, code=451, status="4.7.1",
                    response="greylisted, come back later", next_attempt_at=later,
                ),
                "carol@other.test": AttemptRecord(
                    0, Outcome.DELIVERED, **common, **mx_other, code=250, status="2.0.0",
                    response="ok queued as 42",
                ),
                "x@dest.test": AttemptRecord(
                    0, Outcome.DEFERRED, **common, **mx_dest, code=421, status="4.3.2",
                    response="try later", next_attempt_at=later,
                ),
                "y@other.test": AttemptRecord(
                    0, Outcome.DEFERRED, **common, **mx_other, code=452, status="4.2.2",
                    response="mailbox full", next_attempt_at=later,
                ),
            },
        )  # fmt: skip
    finally:
        await spool.close()
    q = Queue(config, queue_url or queue_dir / "outbound.db", first, second, third)
    q.query("UPDATE messages SET received_at = received_at - 3 * 3600 WHERE queue_id = ?", (third,))
    # x@dest.test: back to plain "queued", as if never tried.
    q.query(
        "UPDATE recipients SET status = 'queued', attempts = 0, last_code = NULL,"
        " last_status = NULL, last_response = NULL, last_mx = NULL WHERE queue_id = ?",
        (second,),
    )
    return q


# ------------------------------------------------------------------ list


async def test_list_shows_unfinished_recipients_as_an_aligned_table(queue: Queue) -> None:
    result = await ctl(queue.config, "list")
    assert result.code == 0 and result.err == ""
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "QUEUE", "ID", "AGE", "SIZE", "SENDER", "RECIPIENT", "STATUS", "TRY", "NEXT",
        "LAST", "REPLY",
    ]  # fmt: skip
    assert lines[-1] == "-- 3 recipient(s)"
    rows = lines[1:-1]
    # oldest message first; finished recipients (carol, delivered) left out
    assert [r.split()[0] for r in rows] == [queue.other, queue.greylisted, queue.nullsender]
    assert "carol@other.test" not in result.out
    assert all(len(line) <= 100 for line in lines)
    assert not ANSI.search(result.out)  # not a terminal: no colours
    bob = next(r for r in rows if "bob@dest.test" in r)
    assert re.search(r"deferred\s+1\s+(59m|1h)\s+451 grey", bob)
    assert re.search(r"<>\s+x@dest.test\s+queued\s+0", next(r for r in rows if "x@dest" in r))
    # columns line up: every row has its STATUS where the header has it
    status_at = lines[0].index("STATUS")
    assert {r[status_at : status_at + 6].strip() for r in rows} <= {"deferr", "queued"}


async def test_list_filters(queue: Queue) -> None:
    by_status = await ctl(queue.config, "list", "--status", "delivered")
    [carol] = by_status.out.splitlines()[1:-1]
    assert carol.startswith(queue.greylisted) and "carol@other" in carol and "delivered" in carol
    by_domain = await ctl(queue.config, "list", "--domain", "DEST.test")
    assert {line.split()[0] for line in by_domain.out.splitlines()[1:-1]} == {
        queue.greylisted,
        queue.nullsender,
    }
    by_sender = await ctl(queue.config, "list", "--sender", "mallory@sender.test")
    assert by_sender.out.splitlines()[1].split()[0] == queue.other
    assert by_sender.out.splitlines()[-1] == "-- 1 recipient(s)"
    older = await ctl(queue.config, "list", "--older-than", "2h")
    assert [line.split()[0] for line in older.out.splitlines()[1:-1]] == [queue.other]
    limited = await ctl(queue.config, "list", "--limit", "2")
    assert len(limited.out.splitlines()) == 4
    assert limited.out.splitlines()[-1] == "-- 2 recipient(s) (--limit reached)"
    nothing = await ctl(queue.config, "list", "--domain", "nowhere.test")
    assert (nothing.code, nothing.out) == (0, "no matching recipients\n")


async def test_list_json(queue: Queue) -> None:
    result = await ctl(queue.config, "list", "--json", "--domain", "dest.test")
    assert result.code == 0
    entries = json.loads(result.out)
    bob = next(e for e in entries if e["recipient"] == "bob@dest.test")
    assert bob["queue_id"] == queue.greylisted
    assert bob["status"] == "deferred" and bob["attempts"] == 1
    assert (bob["last_code"], bob["last_status"]) == (451, "4.7.1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", bob["next_attempt_at"])
    assert bob["size"] == len(BODY) and bob["mail_from"] == SENDER
    assert json.loads((await ctl(queue.config, "list", "--json", "--domain", "x.test")).out) == []


async def test_list_on_an_empty_queue(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", dns_port=free_port(), mx_port=free_port())
    spool = await Spool.open(load_config(config).outbound.queue_dir)
    await spool.close()
    result = await ctl(config, "list")
    assert (result.code, result.out) == (0, "queue is empty\n")


async def test_list_usage_errors(queue: Queue) -> None:
    assert_usage(await ctl(queue.config, "list", "--status", "lost"), r"invalid choice: 'lost'")
    assert_usage(await ctl(queue.config, "list", "--older-than", "soon"), r"not a duration")
    assert_usage(await ctl(queue.config, "list", "--limit", "0"), r"must be at least 1")
    assert_usage(await ctl(queue.config, "list", "--colour"), r"unrecognized arguments")


def test_list_uses_colours_only_on_a_terminal(queue: Queue) -> None:
    """Under a pseudo-terminal the status column is coloured (and NO_COLOR wins)."""

    def run_on_pty(extra_env: dict[str, str]) -> str:
        leader, follower = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | extra_env
        pid = os.fork()
        if pid == 0:  # child: stdout is the terminal
            os.dup2(follower, 1)
            os.execve(
                sys.executable,
                [sys.executable, "-m", "outboundd.ctl", "-c", str(queue.config), "list"],
                env,
            )
        os.close(follower)
        chunks = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return b"".join(chunks).decode()

    coloured = run_on_pty({"COLUMNS": "100"})
    assert "\x1b[33mdeferred" in coloured and "\x1b[0m" in coloured
    assert all(len(ANSI.sub("", line)) <= 100 for line in coloured.splitlines())
    assert not ANSI.search(run_on_pty({"COLUMNS": "100", "NO_COLOR": "1"}))


# ------------------------------------------------------------------ show


async def test_show_envelope_headers_recipients_and_history(queue: Queue) -> None:
    result = await ctl(queue.config, "show", queue.greylisted)
    assert result.code == 0 and result.err == ""
    out = result.out
    assert f"Queue ID:    {queue.greylisted}\n" in out
    assert f"From:        <{SENDER}>\n" in out
    assert "(auth alice)" in out
    assert f"Size:        {len(BODY)} bytes\n" in out
    assert "Subject:     quarterly report\n" in out
    assert "Message-ID:  <q1@sender.test>\n" in out
    assert "<bob@dest.test>  deferred, 1 attempt(s), next " in out
    assert re.search(r"#1 \S+ deferred\s+mx\.dest\.test\[127\.0\.0\.2\]:25 451 4\.7\.1 grey", out)
    assert "<carol@other.test>  delivered, 1 attempt(s)\n" in out
    assert re.search(r"#1 \S+ delivered mx\.other\.test\[127\.0\.0\.3\]:25 TLSv1\.3 250", out)


async def test_show_json(queue: Queue) -> None:
    result = await ctl(queue.config, "show", queue.greylisted, "--json")
    data = json.loads(result.out)
    assert data["queue_id"] == queue.greylisted and data["auth_user"] == "alice"
    assert data["headers"]["Subject"] == "quarterly report"
    bob, carol = data["recipients"]
    assert bob["recipient"] == "bob@dest.test" and bob["status"] == "deferred"
    [attempt] = bob["history"]
    assert (attempt["code"], attempt["outcome"], attempt["mx_ip"]) == (451, "deferred", "127.0.0.2")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", attempt["finished_at"])
    assert carol["history"][0]["tls"] == "TLSv1.3"


async def test_show_unknown_id(queue: Queue) -> None:
    assert_failed(
        await ctl(queue.config, "show", "NOPE"), r"^outboundctl: no message with queue ID NOPE$"
    )
    assert_usage(await ctl(queue.config, "show"), r"required: ID")


# ----------------------------------------------------------------- flush


def _due_in(queue: Queue, qid: str) -> list[float]:
    rows = queue.query(
        "SELECT next_attempt_at FROM recipients WHERE queue_id = ? AND status = 'deferred'", (qid,)
    )
    return [row[0] - time.time() for row in rows]


async def test_flush_by_id_domain_and_all(queue: Queue) -> None:
    result = await ctl(queue.config, "flush", queue.greylisted)
    assert (result.code, result.out) == (0, "1 recipient(s) due now\n")
    assert all(d <= 0 for d in _due_in(queue, queue.greylisted))
    assert all(d > 3000 for d in _due_in(queue, queue.other))
    # failure counts are kept: flushing is not forgiving
    assert queue.query("SELECT failures FROM recipients WHERE recipient = 'bob@dest.test'") == [
        (1,)
    ]

    result = await ctl(queue.config, "flush", "--domain", "other.test")
    assert result.out == "1 recipient(s) due now\n"
    assert all(d <= 0 for d in _due_in(queue, queue.other))
    result = await ctl(queue.config, "flush")
    assert result.out == "1 recipient(s) due now\n"  # x@dest.test, queued for later
    result = await ctl(queue.config, "flush")
    assert result.out == "0 recipient(s) due now\n"  # everything is already due


async def test_flush_ids_with_domain(queue: Queue) -> None:
    result = await ctl(
        queue.config, "flush", queue.greylisted, queue.other, "--domain", "dest.test"
    )
    assert result.out == "1 recipient(s) due now\n"
    assert all(d > 3000 for d in _due_in(queue, queue.other))


async def test_flush_unknown_id_changes_nothing(queue: Queue) -> None:
    assert_failed(
        await ctl(queue.config, "flush", queue.greylisted, "NOPE"), r"no message with queue ID NOPE"
    )
    assert all(d > 3000 for d in _due_in(queue, queue.greylisted))


# ---------------------------------------------------------- delete/bounce


async def test_delete_drops_without_dsn(queue: Queue) -> None:
    result = await ctl(queue.config, "delete", queue.greylisted)
    assert (result.code, result.out) == (
        0,
        f"{queue.greylisted}: 1 recipient(s) dropped, no DSN sent\n",
    )
    rows = queue.query(
        "SELECT recipient, status, final_reason FROM recipients WHERE queue_id = ? ORDER BY id",
        (queue.greylisted,),
    )
    assert rows == [
        ("bob@dest.test", "dropped", "deleted by operator"),
        ("carol@other.test", "delivered", None),
    ]
    # The reason is in the accounting view, not only in `show`; the old remote
    # reply (a 451 greylisting) no longer stands as the row's last word.
    assert queue.query(
        "SELECT last_code, last_status, last_response FROM deliveries "
        "WHERE queue_id = ? AND recipient = 'bob@dest.test'",
        (queue.greylisted,),
    ) == [(None, "5.0.0", "deleted by operator")]
    assert queue.query("SELECT count(*) FROM messages WHERE dsn_of IS NOT NULL") == [(0,)]
    assert queue.query(
        "SELECT finished_at IS NOT NULL FROM messages WHERE queue_id = ?", (queue.greylisted,)
    ) == [(1,)]
    again = await ctl(queue.config, "delete", queue.greylisted)
    assert again.code == 0 and "nothing to drop" in again.out
    assert_failed(await ctl(queue.config, "delete", "NOPE"), r"no message with queue ID NOPE")


async def test_bounce_queues_one_dsn_to_the_sender(queue: Queue) -> None:
    result = await ctl(queue.config, "bounce", queue.other, "--reason", "spam complaint")
    assert result.code == 0, result
    match = re.fullmatch(
        rf"{re.escape(queue.other)}: 1 recipient\(s\) bounced, DSN (\S+) queued\n", result.out
    )
    assert match is not None, result.out
    dsn_qid = match[1]
    assert queue.query(
        "SELECT status, final_reason LIKE '%spam complaint%' FROM recipients WHERE queue_id = ?",
        (queue.other,),
    ) == [("bounced", 1)]
    assert queue.query(
        "SELECT last_code, last_status, last_response FROM deliveries WHERE queue_id = ?",
        (queue.other,),
    ) == [(None, "5.0.0", "bounced by the operator: spam complaint")]
    assert queue.query("SELECT mail_from, dsn_of FROM messages WHERE queue_id = ?", (dsn_qid,)) == [
        ("", queue.other)
    ]
    assert queue.query("SELECT recipient FROM recipients WHERE queue_id = ?", (dsn_qid,)) == [
        ("mallory@sender.test",)
    ]
    assert queue.query(
        "SELECT queue_id, recipient, dsn_queue_id, dsn_recipient, dsn_status FROM dsn_reports"
    ) == [(queue.other, "y@other.test", dsn_qid, "mallory@sender.test", "queued")]
    again = await ctl(queue.config, "bounce", queue.other)
    assert again.code == 0 and "nothing to bounce" in again.out


async def test_bounce_null_sender_sends_no_dsn(queue: Queue) -> None:
    result = await ctl(queue.config, "bounce", queue.nullsender)
    assert (
        result.out
        == f"{queue.nullsender}: 1 recipient(s) bounced, no DSN sent (null sender or NOTIFY)\n"
    )
    assert queue.query("SELECT count(*) FROM messages WHERE dsn_of IS NOT NULL") == [(0,)]
    assert_failed(await ctl(queue.config, "bounce", "NOPE"), r"no message with queue ID NOPE")


# ----------------------------------------------------------------- stats


async def test_stats_text_and_json(queue: Queue) -> None:
    text = await ctl(queue.config, "stats")
    assert text.code == 0
    assert "delivery:        running\n" in text.out
    assert "messages queued: 3 (" in text.out
    assert "recipients:      queued 1, sending 0, deferred 2\n" in text.out
    assert re.search(r"oldest deferred: 3h\n", text.out)
    assert "last hour:       delivered 1, deferred 3, bounced 0, dropped 0\n" in text.out
    assert re.search(r"top domains:\n\s+2  dest\.test\n\s+1  other\.test\n", text.out)

    data = json.loads((await ctl(queue.config, "stats", "--json")).out)
    assert data["by_status"] == {"queued": 1, "sending": 0, "deferred": 2}
    assert data["top_domains"] == [
        {"domain": "dest.test", "recipients": 2},
        {"domain": "other.test", "recipients": 1},
    ]
    assert 3 * 3600 - 60 < data["oldest_deferred_age_seconds"] < 3 * 3600 + 60
    assert data["last_hour"] == {"delivered": 1, "deferred": 3, "bounced": 0, "dropped": 0}
    assert data["queue_bytes"] == 3 * len(BODY) and data["queued_messages"] == 3
    assert data["paused"] is False


# --------------------------------------------------------- pause / resume


async def test_pause_and_resume_say_the_state(queue: Queue) -> None:
    paused = await ctl(queue.config, "pause")
    assert paused.code == 0 and paused.out.startswith("delivery paused:")
    assert queue.query("SELECT value FROM control WHERE key = 'paused'") == [("1",)]
    assert "(it already was)" in (await ctl(queue.config, "pause")).out
    assert "delivery:        PAUSED" in (await ctl(queue.config, "stats")).out
    resumed = await ctl(queue.config, "resume")
    assert (resumed.code, resumed.out) == (0, "delivery running\n")
    assert (await ctl(queue.config, "resume")).out == "delivery running (it was not paused)\n"
    assert json.loads((await ctl(queue.config, "stats", "--json")).out)["paused"] is False


async def test_resume_says_when_outbound_ini_still_holds_delivery(queue: Queue) -> None:
    ini = queue.config / "outbound.ini"
    ini.write_text(ini.read_text() + "disabled=true\n")
    await ctl(queue.config, "pause")
    resumed = await ctl(queue.config, "resume")
    assert resumed.out == "delivery resumed, but still held: outbound.ini has disabled=true\n"


# ------------------------------------------------------------------ users


async def test_user_add_list_del(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", dns_port=free_port(), mx_port=free_port())
    empty = await ctl(config, "user", "list")
    assert (empty.code, empty.out) == (0, "")
    assert "no users in" in empty.err
    added = await ctl(
        config, "user", "add", "alice@sender.test", "--password-stdin", stdin="s3cret\n"
    )
    assert (added.code, added.out) == (0, "user alice@sender.test added\n")
    updated = await ctl(
        config, "user", "add", "alice@sender.test", "--password-stdin", stdin="new\n"
    )
    assert updated.out == "user alice@sender.test updated\n"
    await ctl(config, "user", "add", "bob", "--password-stdin", stdin="pw\n")
    assert (await ctl(config, "user", "list")).out == "alice@sender.test\nbob\n"
    stored = (config / "auth_flat_file.ini").read_text()
    assert "s3cret" not in stored and "new" not in stored.split("=", 1)[-1].split()
    from outboundd.plugins.auth_flat_file import read_users, verify_password

    assert verify_password(read_users(config / "auth_flat_file.ini")["alice@sender.test"], "new")
    deleted = await ctl(config, "user", "del", "bob")
    assert (deleted.code, deleted.out) == (0, "user bob deleted\n")
    assert (await ctl(config, "user", "list")).out == "alice@sender.test\n"


async def test_user_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", dns_port=free_port(), mx_port=free_port())
    assert_failed(await ctl(config, "user", "del", "nobody"), r"no user nobody in ")
    assert_failed(
        await ctl(config, "user", "add", "carol"),
        r"give the password on stdin with --password-stdin",
    )
    assert_failed(
        await ctl(config, "user", "add", "carol", "--password-stdin", stdin="\n"),
        r"password is empty",
    )
    assert_failed(
        await ctl(config, "user", "add", "a=b", "--password-stdin", stdin="pw\n"), r"contains '='"
    )
    assert_usage(await ctl(config, "user"), r"required: ACTION")
    assert_usage(await ctl(config, "user", "add"), r"required: name")


# ----------------------------------------------------- usage and the queue


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert_usage(await ctl(tmp_path, "frobnicate"), r"invalid choice: 'frobnicate'")
    assert_usage(await ctl(tmp_path), r"required: COMMAND")


async def test_missing_config_queue_and_unreadable_queue(tmp_path: Path) -> None:
    assert_failed(
        await ctl(tmp_path / "nope", "list"), r"^outboundctl: no configuration directory .*nope"
    )
    config = write_config(tmp_path / "config", dns_port=free_port(), mx_port=free_port())
    assert_failed(
        await ctl(config, "stats"), r"^outboundctl: no queue at .*queue \(has outboundd run"
    )
    assert not (tmp_path / "queue").exists()  # inspecting never creates a queue
    spool = await Spool.open(load_config(config).outbound.queue_dir)
    await spool.close()
    db = tmp_path / "queue" / "outbound.db"
    db.chmod(0o000)
    try:
        if not os.access(db, os.R_OK):  # root reads it anyway
            assert_failed(await ctl(config, "list"), r"cannot open the queue .*permission denied")
    finally:
        db.chmod(0o600)
    for name in ("outbound.db-wal", "outbound.db-shm"):
        (tmp_path / "queue" / name).unlink(missing_ok=True)
    db.write_bytes(b"this is not an SQLite database, just junk " * 100)
    assert_failed(await ctl(config, "list"), r"cannot open the queue .*: file is not a database")
    (config / "outbound.ini").write_text("[main]\nconcurrency_max=ten\n")
    result = await ctl(config, "list")
    assert_failed(result, r"^outboundctl: .*outbound\.ini.*concurrency_max")


async def test_help_exits_0(tmp_path: Path) -> None:
    result = await ctl(tmp_path, "--help")
    assert result.code == 0
    for command in (
        "list",
        "show",
        "flush",
        "bounce",
        "delete",
        "stats",
        "pause",
        "resume",
        "user",
    ):
        assert command in result.out


# ------------------------------------------------ with the daemon running


@dataclass
class World:
    dns: DNSServer
    mx: MXServer  # 127.0.0.2: mx.dest.test
    sender_mx: MXServer  # 127.0.0.3: mx.sender.test, where DSNs go
    tmp: Path
    queue_url: str | None  # None: SQLite; else the PostgreSQL queue (run against both)

    def config(self, **outbound: object) -> Path:
        if self.queue_url:
            outbound.setdefault("queue_url", self.queue_url)
        return write_config(
            self.tmp / "config", dns_port=self.dns.port, mx_port=self.mx.port, outbound=outbound
        )


@pytest.fixture
async def world(
    dns_server: DNSServer, tmp_path: Path, queue_url: str | None
) -> AsyncIterator[World]:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.3"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.2"))
        smx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3", port=mx.port))
        yield World(dns_server, mx, smx, tmp_path, queue_url)


async def test_flush_makes_the_running_daemon_deliver_within_a_second(world: World) -> None:
    world.mx.script = MXScript(rcpt_default="451 4.7.1 greylisted")
    async with running(world.config(temp_fail_intervals="1h")) as d:
        qid = await send(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "deferred")
        listed = await ctl(d.config_dir, "list", "--domain", "dest.test")
        assert re.search(rf"{re.escape(qid)}.*bob@dest\.test\s+deferred\s+1\s+\d+m", listed.out)
        world.mx.script = MXScript()
        result = await ctl(d.config_dir, "flush", qid)
        assert result.out == "1 recipient(s) due now\n"
        flushed_at = time.monotonic()
        await d.wait_for_status(qid, "delivered", timeout=5)
        assert time.monotonic() - flushed_at < 1.5
        assert d.query("SELECT attempts FROM deliveries WHERE queue_id = ?", (qid,)) == [(2,)]


async def test_pause_holds_and_resume_releases_the_running_daemon(world: World) -> None:
    async with running(world.config()) as d:
        assert (await ctl(d.config_dir, "pause")).code == 0
        await asyncio.sleep(0.6)  # the daemon re-reads the switch every half second
        qid = await send(d.smtp_port, SENDER, ["bob@dest.test"])
        await asyncio.sleep(1.2)
        assert d.query("SELECT status FROM deliveries WHERE queue_id = ?", (qid,)) == [("queued",)]
        assert world.mx.transactions == []
        result = await ctl(d.config_dir, "resume")
        assert result.out == "delivery running\n"
        resumed_at = time.monotonic()
        await d.wait_for_status(qid, "delivered", timeout=5)
        assert time.monotonic() - resumed_at < 1.5


async def test_bounce_sends_the_dsn_to_the_senders_mx(world: World) -> None:
    world.mx.script = MXScript(rcpt_default="452 4.2.2 mailbox full")
    async with running(world.config(temp_fail_intervals="1h")) as d:
        qid = await send(d.smtp_port, SENDER, ["bob@dest.test", "carol@dest.test"])
        await d.wait_for_status(qid, "deferred", count=2)
        result = await ctl(d.config_dir, "bounce", qid, "--reason", "sender asked us to stop")
        match = re.fullmatch(rf"{re.escape(qid)}: 2 recipient\(s\) bounced, DSN (\S+) queued\n",
                             result.out)  # fmt: skip
        assert match is not None, result
        await d.wait_for_status(match[1], "delivered")
        [dsn] = world.sender_mx.transactions
        assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [SENDER]  # the null sender
        assert b"sender asked us to stop" in dsn.body
        assert b"Final-Recipient: rfc822; bob@dest.test" in dsn.body
        assert b"Final-Recipient: rfc822; carol@dest.test" in dsn.body
        assert d.query(
            "SELECT DISTINCT dsn_queue_id, dsn_status FROM dsn_reports WHERE queue_id = ?", (qid,)
        ) == [(match[1], "delivered")]
        shown = await ctl(d.config_dir, "show", qid)
        assert f"    DSN: {match[1]}\n" in shown.out
