"""queue_outbound / pre_send_trans_email results, failing plugins, spool failures."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from outboundd.hooks import HookResult, HookRunner, delay, deny, denysoft, ok
from outboundd.submission.transaction import Transaction
from tests.submission_fixtures import ME, PASSWORD, LineClient, make_config, running_relay

MESSAGE = b"Subject: hooks\r\n\r\nbody\r\n"


async def submit(port: int, *, rcpts: tuple[str, ...] = ("b@example.org",)) -> str:
    """One message over SMTP; the reply to the end of DATA."""
    client = await LineClient.connect(port)
    await client.cmd("EHLO client.test")
    credentials = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert (await client.cmd(f"AUTH PLAIN {credentials}")).startswith("235")
    await client.cmd("MAIL FROM:<a@example.com> ENVID=env1")
    for rcpt in rcpts:
        assert (await client.cmd(f"RCPT TO:<{rcpt}> NOTIFY=NEVER")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(MESSAGE + b".\r\n")
    reply = await client.reply()
    assert (await client.cmd("NOOP")).startswith("250")  # the session survives
    await client.close()
    return reply


def runner(hook: str, fn: object, *, timeout: float = 30.0) -> HookRunner:
    hooks = HookRunner([], timeout=timeout)
    hooks.add("test_plugin", hook, fn)  # type: ignore[arg-type]
    return hooks


async def test_queue_outbound_ok_takes_the_message(tmp_path: Path) -> None:
    seen: list[Transaction] = []

    async def queue_outbound(txn: Transaction) -> HookResult:
        seen.append(txn)
        return ok()

    async with running_relay(
        make_config(tmp_path), runner("queue_outbound", queue_outbound)
    ) as relay:
        reply = await submit(relay.port())
        assert reply.startswith("250 2.0.0 Ok: accepted as ")
        assert relay.messages() == [] and relay.body_files() == []
    [txn] = seen
    assert reply.endswith(txn.queue_id)
    assert (txn.mail_from, txn.rcpt_to, txn.auth_user, txn.remote_ip) == (
        "a@example.com", ["b@example.org"], "alice", "127.0.0.1",
    )  # fmt: skip
    assert txn.env_id == "env1" and txn.rcpt_params["b@example.org"].notify == "NEVER"
    assert txn.header("Message-ID") == f"<{txn.queue_id}@{ME}>"
    assert txn.header("Received") is not None and txn.helo == "client.test"


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (deny("we do not send that"), "550 5.7.1 we do not send that"),
        (deny(), "550 5.7.1 Message refused"),
        (denysoft("busy\r\n250 forged"), "451 4.7.1 busy  250 forged"),
        (denysoft(), "451 4.7.1 Message temporarily refused"),
        (delay(5), "451 4.3.0"),
    ],
)
async def test_queue_outbound_refusals(tmp_path: Path, result: HookResult, expected: str) -> None:
    async def queue_outbound(txn: Transaction) -> HookResult:
        return result

    async with running_relay(
        make_config(tmp_path), runner("queue_outbound", queue_outbound)
    ) as relay:
        reply = await submit(relay.port())
        assert reply.startswith(expected), reply
        assert relay.messages() == []


async def test_raising_plugin_gives_451_and_a_log_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def queue_outbound(txn: Transaction) -> None:
        raise RuntimeError("database unreachable")

    async with running_relay(
        make_config(tmp_path), runner("queue_outbound", queue_outbound)
    ) as relay:
        reply = await submit(relay.port())
        assert reply.startswith("451 4.3.0")
        assert relay.messages() == []
    out = capsys.readouterr().out
    assert "plugin failed" in out and "test_plugin" in out and "database unreachable" in out
    assert "Traceback" not in out


async def test_slow_plugin_times_out_with_451(tmp_path: Path) -> None:
    async def pre_send_trans_email(txn: Transaction) -> None:
        await asyncio.sleep(5)

    hooks = runner("pre_send_trans_email", pre_send_trans_email, timeout=0.1)
    async with running_relay(make_config(tmp_path), hooks) as relay:
        assert (await submit(relay.port())).startswith("451 4.3.0")
        assert relay.messages() == []


async def test_junk_result_gives_451(tmp_path: Path) -> None:
    async def queue_outbound(txn: Transaction) -> str:
        return "ok"

    async with running_relay(
        make_config(tmp_path), runner("queue_outbound", queue_outbound)
    ) as relay:
        assert (await submit(relay.port())).startswith("451 4.3.0")


async def test_pre_send_trans_email_edits_what_is_stored(tmp_path: Path) -> None:
    async def pre_send_trans_email(txn: Transaction) -> HookResult:
        txn.add_header("X-Scanned", "clean")
        txn.notes["campaign"] = "spring"
        txn.rcpt_to.append("archive@example.net")
        return ok()  # ok() here means "prepared": the message is still spooled

    hooks = runner("pre_send_trans_email", pre_send_trans_email)
    async with running_relay(make_config(tmp_path), hooks) as relay:
        reply = await submit(relay.port())
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        [(qid, *_rest, notes)] = relay.messages()
        assert json.loads(notes) == {"campaign": "spring"}
        assert [r[:2] for r in relay.recipients(qid)] == [
            ("b@example.org", "NEVER"), ("archive@example.net", None),
        ]  # fmt: skip
        assert b"X-Scanned: clean\r\n" in relay.body(qid)


async def test_pre_send_trans_email_refusals(tmp_path: Path) -> None:
    async def pre_send_trans_email(txn: Transaction) -> HookResult | None:
        if "deny@example.org" in txn.rcpt_to:
            return deny("not this one")
        if "soft@example.org" in txn.rcpt_to:
            return denysoft("later")
        txn.rcpt_to.clear()
        return None

    hooks = runner("pre_send_trans_email", pre_send_trans_email)
    async with running_relay(make_config(tmp_path), hooks) as relay:
        assert (await submit(relay.port(), rcpts=("deny@example.org",))) == "550 5.7.1 not this one"
        assert (await submit(relay.port(), rcpts=("soft@example.org",))) == "451 4.7.1 later"
        assert (await submit(relay.port())).startswith("554 5.5.1 No recipients left")
        assert relay.messages() == []


@pytest.mark.parametrize(
    "sender, recipient",
    [
        ("a@example.com\r\nX: y", "b@example.org"),
        ("a@example.com", "b@example.org\n"),
        ("a@example.com", "b\0@example.org"),
        ("<a@example.com>", "b@example.org"),
        ("a@example.com", "b@example.org>"),
        ("a@example.com", "   "),
        ("a@example.com", ""),
    ],
)
async def test_plugin_leaving_an_unsafe_address_gives_451(
    tmp_path: Path, sender: str, recipient: str
) -> None:
    async def pre_send_trans_email(txn: Transaction) -> None:
        txn.mail_from = sender
        txn.rcpt_to[:] = [recipient]

    hooks = runner("pre_send_trans_email", pre_send_trans_email)
    async with running_relay(make_config(tmp_path), hooks) as relay:
        assert (await submit(relay.port())).startswith("451 4.3.0")
        assert relay.messages() == []


async def test_spool_failure_is_451_and_leaves_nothing(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        credentials = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert (await client.cmd(f"AUTH PLAIN {credentials}")).startswith("235")
        await relay.spool.close()  # every accept now fails inside the real spool
        await client.cmd("MAIL FROM:<a@example.com>")
        assert (await client.cmd("RCPT TO:<b@example.org>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(MESSAGE + b".\r\n")
        reply = await client.reply()
        await client.close()
        assert reply.startswith("451 4.3.0")
        assert relay.body_files() == []
        assert relay.query("SELECT count(*) FROM messages") == [(0,)]
