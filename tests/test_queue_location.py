"""``outbound.ini queue_url``: which backend a configuration selects, and how it is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from outboundd.config import ConfigError, OutboundConfig, load_outbound
from outboundd.spool import describe_location, is_postgres_url


def outbound(tmp_path: Path, text: str) -> OutboundConfig:
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "outbound.ini").write_text("[main]\n" + text + "\n")
    return load_outbound(config, tmp_path)


@pytest.mark.parametrize("value", ["", "sqlite", "  "])
def test_empty_or_sqlite_is_the_queue_directory(tmp_path: Path, value: str) -> None:
    config = outbound(tmp_path, f"queue_url={value}\nqueue_dir=spool")
    assert config.queue_url is None
    assert config.queue_location == tmp_path / "spool"


@pytest.mark.parametrize(
    "url", ["postgresql://outboundd@db.example/outboundd", "postgres://u:p@127.0.0.1:5433/q"]
)
def test_a_postgresql_url_is_the_queue(tmp_path: Path, url: str) -> None:
    config = outbound(tmp_path, f"queue_url={url}")
    assert config.queue_location == url
    assert is_postgres_url(config.queue_location)


@pytest.mark.parametrize("url", ["mysql://db/q", "/var/spool/outboundd", "sqlite:///x.db"])
def test_anything_else_is_a_config_error_naming_the_key(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"outbound\.ini.*queue_url.*not a queue URL"):
        outbound(tmp_path, f"queue_url={url}")


def test_logged_locations_never_show_a_password() -> None:
    assert describe_location("postgresql://u:secret@db:5432/q?sslmode=require") == (
        "postgresql://u:***@db:5432/q?sslmode=require"
    )
    assert describe_location("postgresql://u@db/q") == "postgresql://u@db/q"
    assert describe_location(Path("/srv/queue")) == "/srv/queue"
    assert not is_postgres_url(Path("/srv/queue"))
