"""Delay notices and bounces are DKIM-signed as the ``me`` host's domain.

The bounce path (``delivery/notices.py``) against a real spool; OpenDKIM
checks what was queued.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from outboundd import dsn
from outboundd.config import DkimConfig
from outboundd.delivery.notices import (
    NoticeRecipient,
    NoticeSettings,
    OriginalMessage,
    notice_settings,
    queue_notice,
)
from outboundd.dkimkeys import DkimKey, generate_key
from outboundd.log import get_logger
from outboundd.spool import Spool
from outboundd.submission import prepare
from outboundd.submission.dkim import DkimSigner
from tests.dkimcheck import OpenDkim, opendkim
from tests.submission_fixtures import make_config

__all__ = ["opendkim"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, DkimKey]:
    base = tmp_path_factory.mktemp("dkim")
    return (
        generate_key(base, "relay.example", "rsa1", "rsa"),
        generate_key(base, "relay.example", "ed1", "ed25519"),
    )


def settings(signer: DkimSigner | None) -> NoticeSettings:
    return NoticeSettings(
        me="mx1.relay.example",
        templates=dsn.DsnTemplates(),
        bounce_max_original_size=100_000,
        double_bounce_recipient=None,
        signer=signer,
    )


async def queue_delay_notice(tmp_path: Path, notice_settings: NoticeSettings) -> bytes:
    body_path = tmp_path / "original.eml"
    body_path.write_bytes(b"From: alice@sender.example\r\nSubject: late\r\n\r\nhello\r\n")
    spool = await Spool.open(tmp_path / "queue")
    try:
        outcome = await queue_notice(
            spool,
            notice_settings,
            OriginalMessage("ORIG1", "alice@sender.example", body_path, time.time(), None, None),
            [
                NoticeRecipient(
                    dsn.DsnRecipient("bob@dest.test", "delayed", "4.4.1"), notify="DELAY"
                )
            ],
            event="delay",
            reason="connection timed out",
        )
        assert outcome.dsn_queue_id is not None
        return spool.body_path(outcome.dsn_queue_id).read_bytes()
    finally:
        await spool.close()


async def test_delay_notice_is_signed_with_the_parent_domain_key(
    tmp_path: Path, keys: tuple[DkimKey, DkimKey], opendkim: OpenDkim
) -> None:
    for key in keys:
        opendkim.publish(key)
    signer = DkimSigner({"relay.example": keys}, log=get_logger("dkim"))
    notice = await queue_delay_notice(tmp_path, settings(signer))
    head = notice[: prepare.header_end(notice)]
    assert head.count(b"DKIM-Signature:") == 2 and head.count(b"d=relay.example;") == 2
    assert b"Action: delayed" in notice
    assert await opendkim.passes(notice)


async def test_notice_without_a_key_for_me_is_unsigned(
    tmp_path: Path, keys: tuple[DkimKey, DkimKey]
) -> None:
    signer = DkimSigner({"other.example": keys}, log=get_logger("dkim"))
    notice = await queue_delay_notice(tmp_path, settings(signer))
    assert b"DKIM-Signature" not in notice[: prepare.header_end(notice)]


def test_notice_settings_sign_only_when_enabled(
    tmp_path: Path, keys: tuple[DkimKey, DkimKey]
) -> None:
    config = make_config(tmp_path)
    assert notice_settings(config).signer is None
    enabled = config.model_copy(
        update={"dkim": DkimConfig(enabled=True, keys={"relay.example": keys})}
    )
    signer = notice_settings(enabled).signer
    assert signer is not None and signer.keys == {"relay.example": keys}
