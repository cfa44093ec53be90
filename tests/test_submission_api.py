"""``outboundd.send_email``: the API for plugins and scripts, against the real spool."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import outboundd
from outboundd.hooks import HookResult, HookRunner, deny, denysoft
from outboundd.spool import Spool
from outboundd.submission import api
from outboundd.submission.transaction import Transaction
from tests.submission_fixtures import ME, make_config


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "queue")
    try:
        yield spool
    finally:
        api.uninstall()
        await spool.close()


def stored(spool: Spool, queue_id: str) -> tuple[str, list[str], str]:
    import sqlite3

    con = sqlite3.connect(spool.db_path)
    try:
        (mail_from, notes) = con.execute(
            "SELECT mail_from, notes FROM messages WHERE queue_id = ?", (queue_id,)
        ).fetchone()
        rows = con.execute(
            "SELECT recipient FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,)
        )
        rcpts = [r for (r,) in rows]
    finally:
        con.close()
    return mail_from, rcpts, notes


async def test_not_installed_raises() -> None:
    api.uninstall()
    with pytest.raises(api.NotInstalledError):
        await outboundd.send_email("a@example.com", "b@example.org", "hi")


async def test_send_email_queues_a_prepared_message(tmp_path: Path, spool: Spool) -> None:
    api.install(spool, make_config(tmp_path), HookRunner([]))
    assert outboundd.send_email is api.send_email
    qid = await outboundd.send_email(
        "a@example.com", ["b@example.org", "c@example.net"],
        "Subject: api\nFrom: a@example.com\n\nline one\nlast line without newline",
        notes={"origin": "test"},
    )  # fmt: skip
    assert stored(spool, qid) == (
        "a@example.com", ["b@example.org", "c@example.net"], json.dumps({"origin": "test"},
        separators=(",", ":")),
    )  # fmt: skip
    body = spool.body_path(qid).read_bytes()
    assert body.startswith(f"Received: by {ME} (outboundd) id {qid};\r\n\t".encode())
    assert f"Message-ID: <{qid}@{ME}>\r\n".encode() in body
    assert b"\r\nDate: " in body
    assert body.endswith(b"\r\n\r\nline one\r\nlast line without newline\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"")


async def test_bytes_dot_stuffed_and_header_replacement(tmp_path: Path, spool: Spool) -> None:
    api.install(spool, make_config(tmp_path, received_header=None), HookRunner([]))
    contents = (
        b"Message-ID: <old@example.com>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Subject: s\r\n\r\n..dot\r\n"
    )
    kept = await outboundd.send_email("", "b@example.org", contents, dot_stuffed=True)
    body = spool.body_path(kept).read_bytes()
    assert body == contents.replace(b"..dot", b".dot")
    assert stored(spool, kept)[0] == ""
    fresh = await outboundd.send_email(
        "<a@example.com>", "<b@example.org>", contents, remove_msgid=True, remove_date=True
    )
    body = spool.body_path(fresh).read_bytes()
    assert b"<old@example.com>" not in body and f"<{fresh}@{ME}>".encode() in body
    assert b"2024" not in body.split(b"\r\n\r\n")[0]


async def test_bad_addresses_raise_value_error(tmp_path: Path, spool: Spool) -> None:
    api.install(spool, make_config(tmp_path), HookRunner([]))
    for sender, rcpts in (("bad address", ["b@example.org"]), ("a@example.com", ["nope"]),
                          ("a@example.com", []), ("a@example.com", [""])):  # fmt: skip
        with pytest.raises(ValueError):
            await outboundd.send_email(sender, rcpts, "x")
    qid = await outboundd.send_email("jörg@exämple.com", "b@example.org", "x")
    assert stored(spool, qid)[0] == "jörg@exämple.com"


async def test_hooks_apply_to_send_email(tmp_path: Path, spool: Spool) -> None:
    calls: list[str] = []

    async def queue_outbound(txn: Transaction) -> None:
        calls.append("queue_outbound")

    async def pre_send_trans_email(txn: Transaction) -> HookResult | None:
        calls.append("pre_send_trans_email")
        if txn.rcpt_to == ["deny@example.org"]:
            return deny("no")
        if txn.rcpt_to == ["soft@example.org"]:
            return denysoft("later")
        txn.add_header("X-Via", "api")
        return None

    hooks = HookRunner([])
    hooks.add("p", "queue_outbound", queue_outbound)
    hooks.add("p", "pre_send_trans_email", pre_send_trans_email)
    api.install(spool, make_config(tmp_path), hooks)
    qid = await outboundd.send_email("a@example.com", "b@example.org", "Subject: x\n\nbody\n")
    assert b"X-Via: api\r\n" in spool.body_path(qid).read_bytes()
    with pytest.raises(api.SendEmailError) as info:
        await outboundd.send_email("a@example.com", "deny@example.org", "x")
    assert str(info.value) == "550 5.7.1 no" and not info.value.temporary
    with pytest.raises(api.SendEmailError) as info:
        await outboundd.send_email("a@example.com", "soft@example.org", "x")
    assert info.value.temporary
    assert "queue_outbound" not in calls  # an SMTP-session hook only


async def test_spool_failure_raises_temporary_error(tmp_path: Path, spool: Spool) -> None:
    api.install(spool, make_config(tmp_path), HookRunner([]))
    await spool.close()
    with pytest.raises(api.SendEmailError) as info:
        await outboundd.send_email("a@example.com", "b@example.org", "x")
    assert info.value.reply.code == 451 and info.value.temporary
    assert [p for p in (spool.queue_dir / "bodies").rglob("*") if p.is_file()] == []
