"""The SMTP session over loopback: commands, limits, DATA, smuggling, what is stored."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import aiosmtplib
import pytest

from tests import certs
from tests.submission_fixtures import ME, PASSWORD, LineClient, make_config, running_relay

MESSAGE = b"Subject: hello\r\nFrom: a@example.com\r\n\r\nHello there.\r\n"


async def ehlo_keywords(port: int) -> list[str]:
    client = await LineClient.connect(port)
    reply = await client.cmd("EHLO client.test")
    await client.close()
    return [line[4:] for line in reply.splitlines()[1:]]


async def test_greeting_and_ehlo_advertisement(tmp_path: Path, pki: certs.TestPKI) -> None:
    config = make_config(tmp_path, pki=pki, max_message_size=5000)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.close()
        assert await ehlo_keywords(relay.port()) == [
            "PIPELINING", "SIZE 5000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN",
            "STARTTLS", "AUTH PLAIN LOGIN",
        ]  # fmt: skip


async def test_no_starttls_without_certificate_and_no_auth_without_plugin(tmp_path: Path) -> None:
    config = make_config(tmp_path, plugins=(), max_message_size=0)
    async with running_relay(config) as relay:
        keywords = await ehlo_keywords(relay.port())
        assert "STARTTLS" not in keywords
        assert not any(k.startswith("AUTH") for k in keywords)
        assert "SIZE" in keywords  # 0 = no limit: SIZE without a number (RFC 1870)


async def test_sequence_errors_are_503_and_session_goes_on(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("503 5.5.1")
        await client.cmd("EHLO client.test")
        assert (await client.cmd("RCPT TO:<b@example.org>")).startswith("503 5.5.1")
        assert (await client.cmd("DATA")).startswith("503 5.5.1")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250 2.1.0")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("503 5.5.1 Nested")
        assert (await client.cmd("DATA")).startswith("503 5.5.1 Need RCPT")
        assert (await client.cmd("RSET")).startswith("250 2.0.0")
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")
        assert (await client.cmd("QUIT")).startswith("221 2.0.0")
        await client.close()


async def test_unknown_commands_and_garbage_get_5xx(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        assert (await client.cmd("EHLO client.test")).startswith("250")
        assert (await client.cmd("FROBNICATE now")).startswith("500 5.5.2")
        assert (await client.cmd(b"\x00\xff\xfe\x80garbage")).startswith("500 5.5.2")
        assert (await client.cmd(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")).startswith("5")
        assert (await client.cmd("MAIL")).startswith("501 5.5.2")
        assert (await client.cmd("MAIL FROM:<a@example.com> SIZE=x")).startswith("501 5.5.4")
        assert (await client.cmd("EXPN list")).startswith("502 5.5.1")
        assert (await client.cmd("X" * 5000)).startswith("500")
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")
        await client.close()
        assert relay.messages() == []


async def test_address_validation_replies(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<a@@example.com>")).startswith("501 5.1.7")
        assert (await client.cmd("MAIL FROM:<jörg@example.com>")).startswith("553 5.6.7")
        assert (await client.cmd("MAIL FROM:<a@example.com> XFOO=1")).startswith("555 5.5.4")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await client.cmd("RCPT TO:<b@exa mple.org>")).startswith("501 5.1.3")
        assert (await client.cmd("RCPT TO:<bö@example.org>")).startswith("553 5.6.7")
        assert (await client.cmd("RCPT TO:<b@example.org> NOTIFY=ALWAYS")).startswith("501 5.5.4")
        await client.close()


async def test_smtputf8_addresses_are_accepted_and_flagged(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<jörg@exämple.com> SMTPUTF8")).startswith("250")
        assert (await client.cmd("RCPT TO:<用户@例子.广告>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send("Subject: grüße\r\n\r\nü\r\n.\r\n".encode())
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as ")
        await client.close()
        [(qid, mail_from, *_rest)] = relay.messages()
        assert mail_from == "jörg@exämple.com"
        assert relay.query("SELECT smtputf8, body_8bit FROM messages") == [(1, 1)]
        assert relay.recipients(qid)[0][0] == "用户@例子.广告"
        assert b"with UTF8SMTP id" in relay.body(qid)


async def test_size_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], max_message_size=2000)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<a@example.com> SIZE=2001")).startswith("552 5.3.4")
        assert (await client.cmd("MAIL FROM:<a@example.com> SIZE=100")).startswith("250")
        await client.cmd("RCPT TO:<b@example.org>")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0)
        await client.send((b"y" * 78 + b"\r\n") * 40 + b".\r\n")
        assert (await client.reply()).startswith("552 5.3.4")
        # Nothing stored, and the session is usable for the next message.
        assert relay.messages() == [] and relay.body_files() == []
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        await client.cmd("RCPT TO:<b@example.org>")
        await client.cmd("DATA")
        await client.send(MESSAGE + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        await client.close()
        assert len(relay.messages()) == 1


async def test_long_line_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], max_line_length=998)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.org>")
        await client.cmd("DATA")
        await client.send(b"Subject: x\r\n\r\n" + b"z" * 3000 + b"\r\n.\r\n")
        assert (await client.reply()).startswith("554 5.6.0 Line too long")
        assert (await client.cmd("NOOP")).startswith("250")
        await client.close()
        assert relay.messages() == []


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        (b"h" * 4096, True),  # a header or body line of exactly max_line_length
        (b"h" * 4097, False),
        (b".." + b"h" * 4095, True),  # a 4096-octet line starting with a dot, stuffed
        (b".." + b"h" * 4096, False),  # 4097 octets once unstuffed
        (b"." + b"h" * 4096, True),  # a leading dot on the wire is always the stuffed one
    ],
)
async def test_max_line_length_is_exact(tmp_path: Path, line: bytes, accepted: bool) -> None:
    """Item 24: with max_line_length=4096, 4096 passes and 4097 does not, header or body."""
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], max_line_length=4096)
    async with running_relay(config) as relay:
        for data in (
            b"X-Long: " + line[8:] + b"\r\n\r\nbody\r\n",
            b"Subject: x\r\n\r\n" + line + b"\r\n",
        ):
            if line.startswith(b".") and data.startswith(b"X-Long"):
                continue  # a header line cannot start with a dot
            client = await LineClient.connect(relay.port())
            await client.cmd("EHLO client.test")
            await client.cmd("MAIL FROM:<a@example.com>")
            await client.cmd("RCPT TO:<b@example.org>")
            await client.cmd("DATA")
            await client.send(data + b".\r\n")
            reply = await client.reply()
            assert reply.startswith("250 2.0.0" if accepted else "554 5.6.0"), (len(line), reply)
            await client.close()


async def test_command_line_limit_is_exact(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], max_line_length=4096)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        prefix = "MAIL FROM:<a@example.com> ENVID="
        fits = prefix + "e" * (4096 - len(prefix))
        assert len(fits) == 4096
        reply = await client.cmd(fits)
        assert not reply.startswith("500"), reply  # within the limit: judged on its content
        assert (await client.cmd("RSET")).startswith("250")
        assert (await client.cmd(fits + "e")).startswith("500 5.5.2")
        assert (await client.cmd("NOOP")).startswith("250")
        await client.close()


async def test_max_recipients_is_452_4_5_3(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], max_recipients=2)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        assert (await client.cmd("RCPT TO:<r1@example.org>")).startswith("250")
        assert (await client.cmd("RCPT TO:<r2@example.org>")).startswith("250")
        # The same mailbox again (domain case differs) is no new recipient.
        assert (await client.cmd("RCPT TO:<r2@EXAMPLE.ORG>")).startswith("250 2.1.5")
        # A different local part (case counts there) is.
        assert (await client.cmd("RCPT TO:<R2@example.org>")).startswith("452 4.5.3")
        await client.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@example.net>\nRCPT TO:<victim@example.org>\n"
        b"DATA\nSubject: smuggled\n\nowned\n.\n",
        b"Subject: s\r\n\r\nhello\r\n.\nMAIL FROM:<evil@example.net>\r\n",
        b"Subject: s\r\n\r\nhello\n.\r\nMAIL FROM:<evil@example.net>\r\n",
        b"Subject: s\r\n\r\nhello\r.\r\nRSET\r\n",
        b"Subject: s\r\n\r\nbare\rCR\r\n",
    ],
)
async def test_smtp_smuggling_is_refused(tmp_path: Path, payload: bytes) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.org>")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(payload + b"\r\n.\r\n")
        reply = await client.reply()
        assert reply.startswith("554 5.5.2 Bare CR or LF"), reply
        # Exactly one reply: nothing inside the data ran as a command.
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")
        await client.close()
        assert relay.messages() == [] and relay.body_files() == []


async def test_dot_only_ends_data_at_crlf_dot_crlf_and_is_unstuffed(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.org>")
        await client.cmd("DATA")
        await client.send(b"Subject: dots\r\n\r\n..leading\r\n. not the end\r\nlast\r\n.\r\n")
        reply = await client.reply()
        await client.close()
        qid = reply.rsplit(" ", 1)[1]
        assert relay.body(qid).endswith(b"\r\n\r\n.leading\r\n not the end\r\nlast\r\n")


async def test_disconnect_mid_data_queues_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.org>")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
        await client.close()
        for _ in range(50):
            if not relay.listeners.context.sessions:
                break
            await asyncio.sleep(0.02)
        assert not relay.listeners.context.sessions
        assert relay.messages() == [] and relay.body_files() == []


async def test_dsn_parameters_are_stored(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port(), start_tls=False)
        async with client:
            await client.ehlo(hostname="client.test")
            assert client.supports_extension("dsn")
            await client.mail("a@example.com", options=["RET=HDRS", "ENVID=Case+2BId"])
            orcpt = "ORCPT=rfc822;B+2Bx@Example.org"
            await client.rcpt("b@example.org", options=["NOTIFY=SUCCESS,DELAY", orcpt])
            await client.rcpt("c@example.org", options=["NOTIFY=NEVER"])
            await client.rcpt("d@example.org")
            assert (await client.data(MESSAGE)).code == 250
        [(qid, _, _, client_ip, env_id, ret, *_)] = relay.messages()
        assert (client_ip, env_id, ret) == ("127.0.0.1", "Case+Id", "HDRS")
        assert relay.recipients(qid) == [
            ("b@example.org", "SUCCESS,DELAY", "rfc822;B+x@Example.org", "queued"),
            ("c@example.org", "NEVER", None, "queued"),
            ("d@example.org", None, None, "queued"),
        ]


async def test_stored_message_is_prepared(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.org>")
        await client.cmd("RCPT TO:<c@example.org>")
        await client.cmd("DATA")
        await client.send(MESSAGE + b".\r\n")
        qid = (await client.reply()).rsplit(" ", 1)[1]
        await client.cmd("MAIL FROM:<a@example.com>")
        await client.cmd("RCPT TO:<b@example.org>")
        await client.cmd("DATA")
        await client.send(b"Message-ID: <mine@example.com>\r\nDate: Mon, 1 Jan 2024 0:0:0 +0000\r\n"
                          b"\r\nx\r\n.\r\n")  # fmt: skip
        qid2 = (await client.reply()).rsplit(" ", 1)[1]
        await client.close()
        body = relay.body(qid)
        assert body.startswith(
            b"Received: from client.example ([127.0.0.1])\r\n"
            b"\tby relay.test (outboundd) with ESMTP id " + qid.encode() + b";\r\n\t"
        )
        assert f"Message-ID: <{qid}@{ME}>\r\nDate: ".encode() in body
        assert body.endswith(b"\r\n\r\nHello there.\r\n")
        second = relay.body(qid2)
        assert b"for <b@example.org>;" in second
        assert second.count(b"Message-ID:") == 1 and b"<mine@example.com>" in second
        assert second.count(b"Date:") == 1


async def test_received_header_disabled_and_helo_session(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], received_header=None)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        assert (await client.cmd("HELO old.client")) == f"250 {ME}"
        assert (await client.cmd("MAIL FROM:<a@example.com> SIZE=10")).startswith("501 5.5.2")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        await client.cmd("RCPT TO:<b@example.org>")
        await client.cmd("DATA")
        await client.send(MESSAGE + b".\r\n")
        qid = (await client.reply()).rsplit(" ", 1)[1]
        await client.close()
        assert relay.body(qid).startswith(b"Subject: hello\r\n")


async def test_pipelined_transaction(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
            b"DATA\r\n"
        )
        replies = [await client.reply() for _ in range(4)]
        assert [r[:3] for r in replies] == ["250", "250", "250", "354"]
        await client.send(MESSAGE + b".\r\nQUIT\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as")
        assert (await client.reply()).startswith("221")
        await client.close()


def test_smtplib_client_sendmail(tmp_path: Path) -> None:
    async def run() -> None:
        config = make_config(tmp_path)
        async with running_relay(config) as relay:
            port = relay.port()

            def send() -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.login("alice", PASSWORD)
                    return smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)

            assert await asyncio.to_thread(send) == {}
            [(_, mail_from, auth_user, *_)] = relay.messages()
            assert (mail_from, auth_user) == ("a@example.com", "alice")

    asyncio.run(run())


async def test_inactivity_timeout_counts_from_the_last_command(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"], inactivity_timeout=0.6)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        started = asyncio.get_running_loop().time()
        for _ in range(4):  # 1.2 s in all: each command restarts the clock
            await asyncio.sleep(0.3)
            assert (await client.cmd("NOOP")).startswith("250")
        assert asyncio.get_running_loop().time() - started > 1.0
        # Idle past the timeout: the server hangs up.
        data = await asyncio.wait_for(client.reader.read(), 3)
        idle = asyncio.get_running_loop().time() - started
        assert data == b"" or data.startswith(b"421"), data
        assert idle < 1.2 + 0.6 + 1.0
        await client.close()


def test_a_new_envelope_holds_what_aiosmtpds_own_does() -> None:
    """SubmissionEnvelope skips Envelope.__init__; every attribute it would set is there,
    equal, and each new envelope's containers are its own."""
    from aiosmtpd.smtp import Envelope

    from outboundd.submission.handler import SubmissionEnvelope
    from outboundd.submission.policy import MailParams

    theirs = vars(Envelope())
    ours, other = SubmissionEnvelope(), SubmissionEnvelope()
    assert theirs, "aiosmtpd's Envelope sets its attributes in __init__"
    for name, value in theirs.items():
        assert getattr(ours, name) == value, name
        if isinstance(value, list | dict | set):
            assert getattr(ours, name) is not getattr(other, name), name
    assert (ours.sender, ours.mail_params, ours.recipients) == (None, MailParams(), [])
    ours.rcpt_tos.append("a@example.org")
    ours.mail_from = "b@example.org"
    assert other.rcpt_tos == [] and other.mail_from is None
