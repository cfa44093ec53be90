"""Acceptance: a password sent out of step never reaches the log, in any case.

A client that answers AUTH LOGIN's user-name prompt with raw text gets
``501 5.5.2``; a naive client then sends its password as the next line,
which the server reads as a command.  The reply to that unknown command
quotes the word back (upper-cased), and aiosmtpd logs every reply at
debug level: the password must not appear in the log, not even upper-case.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from outboundd.plugins.auth_flat_file import hash_password
from tests.harness import running, write_config
from tests.submission_fixtures import LineClient

MX_PORT = 9  # nothing is delivered in this test


async def test_a_password_sent_as_a_command_is_not_logged_in_any_case(tmp_path: Path) -> None:
    password = "pw" + secrets.token_hex(10)
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=MX_PORT, plugins=["auth_flat_file"],
        outbound={"delivery_processes": 0},
        smtp={"auth_disconnect_after": 1000, "auth_failure_delay": 0},
        extra_files={"auth_flat_file.ini": f"[users]\nalice = {hash_password(password)}\n",
                     "log.ini": "[main]\nlevel=data\nformat=logfmt\n"},
    )  # fmt: skip
    async with running(config) as d:
        client = await LineClient.connect(d.smtp_port)
        try:
            await client.cmd("EHLO client.test")
            assert (await client.cmd("AUTH LOGIN")).startswith("334")
            assert (await client.cmd("alice")).startswith("501 5.5.2")  # raw user name
            reply = await client.cmd(password)  # the password, now read as a command
            assert reply.startswith("500 5.5.2"), reply
            assert (await client.cmd("NOOP")).startswith("250")
            await client.cmd("QUIT")
        finally:
            await client.close()
        await d.wait_for(r"not recognized")  # the reply line was logged
    log = "\n".join(d.lines).lower()
    assert password.lower() not in log, [ln for ln in d.lines if password.upper() in ln.upper()]
    assert "traceback" not in log and "level=error" not in log


def test_the_logged_unknown_command_reply_masks_the_word() -> None:
    from outboundd.submission.liblog import describe_reply

    masked = describe_reply(b'500 5.5.2 Error: command "HUNTER2" not recognized')
    assert masked == '500 5.5.2 Error: command "<7 octets>" not recognized'
    assert describe_reply("250 2.0.0 OK") == "250 2.0.0 OK"
