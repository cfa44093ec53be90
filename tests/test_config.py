"""The configuration directory: every file, every class of error, the defaults.

Each test writes a config directory under ``tmp_path`` and runs from
``tmp_path`` so error messages name files as an operator sees them
(``config/outbound.ini``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pydantic
import pytest

from outboundd.config import (
    Config,
    ConfigError,
    HostPort,
    default_temp_fail_intervals,
    load_config,
    load_outbound,
    parse_bool,
    parse_ini,
    parse_temp_fail_intervals,
)
from tests.certs import make_pki
from tests.test_session_timeouts import TIMEOUTS as SESSION_TIMEOUTS

REPO = Path(__file__).resolve().parent.parent
HARAKA_DEFAULT = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``config`` directory, with the working directory beside it."""
    directory = tmp_path / "config"
    directory.mkdir()
    monkeypatch.chdir(tmp_path)
    (directory / "me").write_text("mx.test\n")
    return directory


def write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text)


def load(directory: Path) -> Config:
    return load_config(Path("config") if directory.name == "config" else directory)


def error_of(directory: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(directory)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------
# temp_fail_intervals


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s, 1m*2", (10, 60, 60)),
        ("none", ()),
        (" NONE ", ()),
        ("1m, 5m*2, 1h*3", (60, 300, 300, 3600, 3600, 3600)),
        (
            "30s, 1m, 5m, 9m, 15m*3, 30m*2, 1h*3, 2h*3, 1d",
            (30, 60, 300, 540, *(900,) * 3, 1800, 1800, *(3600,) * 3, *(7200,) * 3, 86400),
        ),
        ("5s", (5,)),
        ("1.5m", (90,)),
        ("2D,1H", (172800, 3600)),
        ("  1 m * 2 ,\t10 s ", (60, 60, 10)),
        ("5s*1000", (5,) * 1000),
    ],
)
def test_temp_fail_intervals_grammar(text: str, expected: tuple[float, ...]) -> None:
    result = parse_temp_fail_intervals(text)
    assert result == expected
    assert all(isinstance(x, float) for x in result)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("60 min", "element 1 '60min' is not <n><s|m|h|d>[*count]"),
        ("4s", "element 1 '4s' is shorter than 5 seconds"),
        ("10s, 4.9s", "element 2 '4.9s' is shorter than 5 seconds"),
        ("", "the schedule is empty (write 'none' for no retries)"),
        ("  ", "the schedule is empty (write 'none' for no retries)"),
        ("10s,", "element 2 is empty"),
        ("10s,,20s", "element 2 is empty"),
        ("10", "element 1 '10' is not <n><s|m|h|d>[*count]"),
        ("m", "element 1 'm' is not <n><s|m|h|d>[*count]"),
        ("1y", "element 1 '1y' is not <n><s|m|h|d>[*count]"),
        ("-5m", "element 1 '-5m' is not <n><s|m|h|d>[*count]"),
        ("1m*2*3", "element 1 '1m*2*3' is not <n><s|m|h|d>[*count]"),
        ("1m*", "element 1 '1m*' is not <n><s|m|h|d>[*count]"),
        ("1m*x", "element 1 '1m*x' is not <n><s|m|h|d>[*count]"),
        ("1m*0", "element 1 '1m*0' repeats fewer than once"),
        ("366d", "element 1 '366d' is longer than 365 days"),
        ("5s*1001", "the schedule has more than 1000 retries"),
        ("none,1m", "element 1 'none' is not <n><s|m|h|d>[*count]"),
    ],
)
def test_temp_fail_intervals_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_temp_fail_intervals(text)
    assert str(info.value) == reason


def test_default_intervals() -> None:
    assert default_temp_fail_intervals(13) == HARAKA_DEFAULT
    assert len(default_temp_fail_intervals(13)) == 12
    assert default_temp_fail_intervals(3) == (64, 128)
    assert default_temp_fail_intervals(2) == (64,)
    assert default_temp_fail_intervals(1) == ()
    with pytest.raises(ValueError):
        default_temp_fail_intervals(0)


def test_max_temp_failures_sets_the_default_schedule(cfg: Path) -> None:
    write(cfg, "outbound.ini", "maxTempFailures=3\n")
    config = load(cfg)
    assert config.outbound.temp_fail_intervals == (64, 128)
    assert config.outbound.max_temp_failures == 3
    assert config.warnings == ()


def test_explicit_schedule_overrides_max_temp_failures(cfg: Path) -> None:
    write(cfg, "outbound.ini", "temp_fail_intervals = 10s, 1m*2\n")
    config = load(cfg)
    assert config.outbound.temp_fail_intervals == (10, 60, 60)
    assert config.outbound.max_temp_failures == 4
    assert config.warnings == ()


def test_conflicting_max_temp_failures_is_ignored_with_a_warning(cfg: Path) -> None:
    write(cfg, "outbound.ini", "maxTempFailures=13\ntemp_fail_intervals=none\n")
    config = load(cfg)
    assert config.outbound.temp_fail_intervals == ()
    assert config.outbound.max_temp_failures == 1
    assert config.warnings == (
        "config/outbound.ini [main] maxTempFailures: ignored because temp_fail_intervals is set "
        "(its 0 retries mean failure 1 bounces)",
    )


def test_agreeing_max_temp_failures_gives_no_warning(cfg: Path) -> None:
    write(cfg, "outbound.ini", "maxTempFailures=2\ntemp_fail_intervals=1h\n")
    assert load(cfg).warnings == ()


def test_bad_schedule_is_a_config_error(cfg: Path) -> None:
    write(cfg, "outbound.ini", "[main]\ntemp_fail_intervals=60 min\n")
    assert error_of(cfg) == (
        "config/outbound.ini [main] temp_fail_intervals: '60 min' is not a retry schedule "
        "(<n><s|m|h|d>[*count], ...): element 1 '60min' is not <n><s|m|h|d>[*count]"
    )
    write(cfg, "outbound.ini", "temp_fail_intervals=4s\n")
    assert error_of(cfg) == (
        "config/outbound.ini [main] temp_fail_intervals: '4s' is not a retry schedule "
        "(<n><s|m|h|d>[*count], ...): element 1 '4s' is shorter than 5 seconds"
    )


def test_empty_schedule_means_the_default(cfg: Path) -> None:
    write(cfg, "outbound.ini", "temp_fail_intervals=\n")
    assert load(cfg).outbound.temp_fail_intervals == HARAKA_DEFAULT


# --------------------------------------------------------------------------
# Booleans


@pytest.mark.parametrize("word", ["true", "yes", "ok", "enabled", "on", "1", "TRUE", "Yes", "On"])
def test_true_words(cfg: Path, word: str) -> None:
    assert parse_bool(word) is True
    write(cfg, "outbound.ini", f"disabled={word}\nenable_tls={word}\n")
    outbound = load(cfg).outbound
    assert outbound.disabled is True
    assert outbound.enable_tls is True


@pytest.mark.parametrize("word", ["false", "no", "off", "disabled", "0", "FALSE", "No", "Disabled"])
def test_false_words(cfg: Path, word: str) -> None:
    assert parse_bool(word) is False
    write(cfg, "outbound.ini", f"always_split={word}\nenable_tls={word}\n")
    outbound = load(cfg).outbound
    assert outbound.always_split is False
    assert outbound.enable_tls is False


@pytest.mark.parametrize("word", ["maybe", "2", "t", "y", "enable", "nope"])
def test_other_words_are_errors(cfg: Path, word: str) -> None:
    write(cfg, "outbound.ini", f"disabled={word}\n")
    assert error_of(cfg) == (
        f"config/outbound.ini [main] disabled: '{word}' is not a boolean "
        "(true, yes, ok, enabled, on, 1 or false, no, off, disabled, 0)"
    )


# --------------------------------------------------------------------------
# Defaults


def test_missing_directory_gives_every_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("socket.getfqdn", lambda: "host.example")
    config = load_config(Path("nowhere"))
    assert config.warnings == ("nowhere: no such configuration directory; using defaults",)
    assert config.config_dir == tmp_path / "nowhere"
    assert config.base_dir == tmp_path
    assert config.plugins_dir == tmp_path / "plugins"
    assert config.me == "host.example"

    smtp = config.smtp
    assert smtp.listen == [HostPort("127.0.0.1", 2525)]
    assert smtp.listen_tls == []
    assert smtp.max_message_size == 26214400
    assert smtp.max_recipients == 1000
    assert smtp.auth_require_tls is True
    assert smtp.inactivity_timeout == 300
    assert smtp.max_line_length == 4096
    assert smtp.auth_max_failures == 3
    assert smtp.auth_failure_delay == 2.0
    assert smtp.auth_disconnect_after == 10
    assert smtp.auth_block_seconds == 300
    assert smtp.constrain_sender is False

    out = config.outbound
    assert out.disabled is False
    assert out.concurrency_max == 100
    assert out.domain_concurrency_max == 10
    assert out.enable_tls is True
    assert out.max_temp_failures == 13
    assert out.temp_fail_intervals == HARAKA_DEFAULT
    assert out.always_split is False
    assert out.received_header == "outboundd"
    assert out.connect_timeout == 30
    assert out.local_mx_ok is False
    assert out.inet_prefer == "default"
    assert out.queue_dir == tmp_path / "queue"
    assert out.nameservers == []
    assert out.mx_port == 25
    assert (out.greeting_timeout, out.mail_timeout, out.rcpt_timeout) == (300, 300, 300)
    assert (out.data_timeout, out.data_end_timeout) == (120, 600)
    assert (out.ehlo_timeout, out.starttls_timeout, out.auth_timeout) == (300, 300, 120)
    assert (out.data_block_timeout, out.rset_timeout, out.quit_timeout) == (180, 20, 5)
    assert out.pool_max_per_host == out.domain_concurrency_max == 10
    assert out.pool_idle_timeout == 10
    assert out.delay_warning_time == 14400
    assert out.bounce_max_original_size == 10485760
    assert out.double_bounce_recipient is None
    assert out.lease_seconds == 120

    tls = config.tls
    assert (tls.key, tls.cert) == (None, None)
    assert (tls.main.min_version, tls.main.ciphers) == (None, None)
    assert tls.outbound.reject_unauthorized is False
    assert tls.outbound.force_tls is False
    assert tls.outbound.force_tls_hosts == []
    assert tls.outbound.no_tls_hosts == []

    assert (config.log.level, config.log.timestamps, config.log.format) == (6, False, "default")
    assert config.plugins == []
    assert config.relay_acl_allow == []
    assert config.auth_users == {}
    assert (config.bounce.text, config.bounce.html, config.bounce.image) == (None, None, None)


def test_empty_directory_gives_defaults_without_warnings(cfg: Path) -> None:
    config = load(cfg)
    assert config.warnings == ()
    assert config.outbound.queue_dir == cfg.parent / "queue"
    assert config.me == "mx.test"


def test_empty_values_mean_the_default(cfg: Path) -> None:
    write(cfg, "outbound.ini", "concurrency_max=\nreceived_header=\nqueue_dir=\n")
    out = load(cfg).outbound
    assert out.concurrency_max == 100
    assert out.received_header == "outboundd"
    assert out.queue_dir == cfg.parent / "queue"


def test_config_is_frozen(cfg: Path) -> None:
    config = load(cfg)
    with pytest.raises(pydantic.ValidationError):
        setattr(config.outbound, "concurrency_max", 5)  # noqa: B010 (assignment must fail)
    with pytest.raises(pydantic.ValidationError):
        setattr(config, "me", "other")  # noqa: B010


def test_config_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(Path("config"))
    assert str(info.value) == "config: is not a directory"


def test_absolute_config_dir_outside_cwd_is_named_absolutely(tmp_path: Path) -> None:
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    write(directory, "outbound.ini", "mx_port=0\n")
    with pytest.raises(ConfigError) as info:
        load_config(directory)
    assert str(info.value) == (
        f"{directory}/outbound.ini [main] mx_port: '0' is not between 1 and 65535"
    )


# --------------------------------------------------------------------------
# outbound.ini values and errors


def test_outbound_values(cfg: Path) -> None:
    write(
        cfg,
        "outbound.ini",
        """\
; comment
# another comment
disabled = yes
concurrency_max = 7
domain_concurrency_max = 2
always_split = true
received_header = My relay
connect_timeout = 2.5
local_mx_ok = on
inet_prefer = V6
nameservers = 127.0.0.1, 127.0.0.1:5353, [::1]:53
mx_port = 2525
greeting_timeout = 1
mail_timeout = 2
rcpt_timeout = 3
data_timeout = 4
data_end_timeout = 5
ehlo_timeout = 6
starttls_timeout = 7
auth_timeout = 8
data_block_timeout = 9
rset_timeout = 10
quit_timeout = 0.5
pool_max_per_host = 1
pool_idle_timeout = 0
delay_warning_time = 0
bounce_max_original_size = 0
double_bounce_recipient = postmaster@example.org
lease_seconds = 30
""",
    )
    config = load(cfg)
    assert config.warnings == ()
    out = config.outbound
    assert out.disabled and out.always_split and out.local_mx_ok
    assert (out.concurrency_max, out.domain_concurrency_max) == (7, 2)
    assert out.received_header == "My relay"
    assert out.connect_timeout == 2.5
    assert out.inet_prefer == "v6"
    assert out.nameservers == [
        HostPort("127.0.0.1", 53),
        HostPort("127.0.0.1", 5353),
        HostPort("::1", 53),
    ]
    assert out.mx_port == 2525
    assert (out.greeting_timeout, out.mail_timeout, out.rcpt_timeout) == (1, 2, 3)
    assert (out.data_timeout, out.data_end_timeout) == (4, 5)
    assert (out.ehlo_timeout, out.starttls_timeout, out.auth_timeout) == (6, 7, 8)
    assert (out.data_block_timeout, out.rset_timeout, out.quit_timeout) == (9, 10, 0.5)
    assert (out.pool_max_per_host, out.pool_idle_timeout) == (1, 0)
    assert out.delay_warning_time == 0
    assert out.bounce_max_original_size == 0
    assert out.double_bounce_recipient == "postmaster@example.org"
    assert out.lease_seconds == 30


def test_duplicate_nameserver_is_an_error(cfg: Path) -> None:
    write(cfg, "outbound.ini", "nameservers = [::1]:53, ::1\n")
    assert error_of(cfg) == "config/outbound.ini [main] nameservers: lists [::1]:53 more than once"


def test_nameservers_as_array_lines(cfg: Path) -> None:
    write(cfg, "outbound.ini", "nameservers[]=127.0.0.1:5300\nnameservers[]=127.0.0.2\n")
    assert load(cfg).outbound.nameservers == [
        HostPort("127.0.0.1", 5300),
        HostPort("127.0.0.2", 53),
    ]


def test_received_header_disabled(cfg: Path) -> None:
    write(cfg, "outbound.ini", "received_header=disabled\n")
    assert load(cfg).outbound.received_header is None
    write(cfg, "outbound.ini", "received_header=DISABLED\n")
    assert load(cfg).outbound.received_header is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("concurrency_max=ten", "concurrency_max: 'ten' is not an integer"),
        ("concurrency_max=1.5", "concurrency_max: '1.5' is not an integer"),
        ("concurrency_max=0", "concurrency_max: '0' is not between 1 and 10000"),
        ("domain_concurrency_max=-1", "domain_concurrency_max: '-1' is not between 1 and 10000"),
        ("maxTempFailures=0", "maxTempFailures: '0' is not between 1 and 1000"),
        ("mx_port=70000", "mx_port: '70000' is not between 1 and 65535"),
        ("mx_port=smtp", "mx_port: 'smtp' is not an integer"),
        ("connect_timeout=abc", "connect_timeout: 'abc' is not a number of seconds"),
        ("connect_timeout=-1", "connect_timeout: '-1' is not a number of seconds"),
        ("connect_timeout=0", "connect_timeout: '0' must be greater than 0"),
        ("connect_timeout=nan", "connect_timeout: 'nan' is not a number of seconds"),
        ("data_timeout=30s", "data_timeout: '30s' is not a number of seconds"),
        ("lease_seconds=0", "lease_seconds: '0' must be greater than 0"),
        ("lease_seconds=9.5", "lease_seconds: '9.5' must be at least 10"),
        (
            "lease_seconds=99999999999",
            "lease_seconds: '99999999999' is more than 31536000 seconds (a year)",
        ),
        ("delay_warning_time=-5", "delay_warning_time: '-5' is not a number of seconds"),
        (
            "bounce_max_original_size=-1",
            "bounce_max_original_size: '-1' is not between 0 and 1099511627776",
        ),
        ("inet_prefer=v5", "inet_prefer: 'v5' is not one of default, v4, v6"),
        ("local_mx_ok=sure", "local_mx_ok: 'sure' is not a boolean"),
        (
            "double_bounce_recipient=postmaster",
            "double_bounce_recipient: 'postmaster' is not a mail address (user@domain)",
        ),
        (
            "double_bounce_recipient=<pm@example.org>",
            "double_bounce_recipient: '<pm@example.org>' is not a mail address (user@domain)",
        ),
        (
            "received_header=bad\x01text",
            "received_header: 'bad\\x01text' contains control characters (it becomes a header)",
        ),
        (
            "nameservers=dns.example",
            "nameservers: 'dns.example' is not a valid address: 'dns.example' is not an IP address",
        ),
        (
            "concurrency_max[]=5",
            "concurrency_max: is a single value, not a list "
            "(write concurrency_max=..., not concurrency_max[]=)",
        ),
        ("disabled", "disabled: has no value (write disabled=VALUE)"),
    ],
)
def test_outbound_errors(cfg: Path, line: str, message: str) -> None:
    write(cfg, "outbound.ini", f"[main]\n{line}\n")
    assert error_of(cfg).startswith(f"config/outbound.ini [main] {message}")


def test_long_values_are_cut_in_messages(cfg: Path) -> None:
    write(cfg, "outbound.ini", f"concurrency_max={'x' * 500}\n")
    message = error_of(cfg)
    assert (
        message == f"config/outbound.ini [main] concurrency_max: '{'x' * 120}...' is not an integer"
    )


# --------------------------------------------------------------------------
# The ini reader


def test_parse_ini_haraka_shapes() -> None:
    ini = parse_ini(
        "\ufefftop=1\r\n"
        "; comment\r\n"
        "  # indented comment\r\n"
        "\r\n"
        "[one]\r\n"
        "key = some value with = sign \r\n"
        "list[]=a\r\n"
        "list[] = b\r\n"
        "bare\r\n"
        "long = first \\\r\n"
        "second\r\n"
        "[ two ]\r\n"
        "x=\r\n"
        "[one]\r\n"
        "again=yes\r\n"
    )
    assert ini.sections["main"]["top"].value == "1"
    one = ini.sections["one"]
    assert one["key"].value == "some value with = sign"
    assert one["list"].value == ["a", "b"]
    assert one["list"].line == 8
    assert one["bare"].value is None
    assert one["long"].value == "first second"
    assert one["long"].line == 10
    assert one["again"].value == "yes"
    assert ini.sections["two"]["x"].value == ""
    assert ini.section_lines == {"main": 0, "one": 5, "two": 12}


def test_parse_ini_array_and_scalar_replace_each_other() -> None:
    ini = parse_ini("k[]=a\nk=b\nj=c\nj[]=d\nj[]=e\n")
    assert ini.sections["main"]["k"].value == "b"
    assert ini.sections["main"]["j"].value == ["d", "e"]


def test_parse_ini_repeated_keys_last_wins() -> None:
    ini = parse_ini("[s]\nk=1\nk=2\n")
    assert ini.sections["s"]["k"].value == "2"
    assert ini.repeated == [("s", "k", 3)]


def test_parse_ini_sections_are_case_sensitive() -> None:
    ini = parse_ini("[Main]\nk=1\n")
    assert ini.sections["main"] == {}
    assert ini.sections["Main"]["k"].value == "1"


def test_parse_ini_comment_inside_value_is_kept() -> None:
    assert parse_ini("k = a ; b\n").sections["main"]["k"].value == "a ; b"


def test_parse_ini_continuation_at_end_of_file() -> None:
    assert parse_ini("k = a \\").sections["main"]["k"].value == "a"


def test_parse_ini_continuation_can_be_disabled() -> None:
    ini = parse_ini("[users]\nalice = pass\\\nbob = x\n", continuation=False)
    assert ini.sections["users"]["alice"].value == "pass\\"
    assert ini.sections["users"]["bob"].value == "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[main]\nthis is junk\n",
            "f.ini line 2: 'this is junk' is not a 'key = value' line or a [section]",
        ),
        ("= value\n", "f.ini line 1: '= value' is not a 'key = value' line or a [section]"),
        ("[unclosed\n", "f.ini line 1: '[unclosed' is not a 'key = value' line or a [section]"),
        ("[]\n", "f.ini line 1: empty section name '[]'"),
        ("a=1\nk[x]=1\n", "f.ini line 2: 'k[x]=1' is not a 'key = value' line or a [section]"),
    ],
)
def test_parse_ini_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_ini(text, "f.ini")
    assert str(info.value) == message


def test_invalid_line_in_a_file(cfg: Path) -> None:
    write(cfg, "smtp.ini", "[main]\nlisten=127.0.0.1:2525\nmax recipients = 5\n")
    assert error_of(cfg) == (
        "config/smtp.ini line 3: 'max recipients = 5' is not a 'key = value' line or a [section]"
    )


def test_non_utf8_file(cfg: Path) -> None:
    (cfg / "outbound.ini").write_bytes(b"[main]\nreceived_header=caf\xe9\n")
    assert error_of(cfg) == "config/outbound.ini line 2: is not valid UTF-8 text"


def test_directory_instead_of_file(cfg: Path) -> None:
    (cfg / "outbound.ini").mkdir()
    assert error_of(cfg) == "config/outbound.ini: is a directory, expected a file"


# --------------------------------------------------------------------------
# Warnings (unknown keys are not errors)


def test_unknown_keys_and_sections_are_warnings(cfg: Path) -> None:
    write(
        cfg,
        "outbound.ini",
        "concurency_max=5\nMaxTempFailures=3\nwhatever=1\n[extra]\nk=v\n[mian]\n",
    )
    config = load(cfg)
    assert config.outbound.concurrency_max == 100
    assert config.warnings == (
        "config/outbound.ini [extra] (line 4): unknown section, ignored",
        "config/outbound.ini [mian] (line 6): unknown section, ignored (did you mean main?)",
        "config/outbound.ini [main] concurency_max (line 1): unknown setting, ignored "
        "(did you mean concurrency_max?)",
        "config/outbound.ini [main] MaxTempFailures (line 2): unknown setting, ignored "
        "(did you mean maxTempFailures?)",
        "config/outbound.ini [main] whatever (line 3): unknown setting, ignored",
    )


def test_haraka_settings_we_do_not_use_are_named(cfg: Path) -> None:
    write(cfg, "smtp.ini", "[main]\ndaemonize=true\n[headers]\nmax_lines=1000\n")
    write(cfg, "outbound.ini", "pool_timeout=50\n")
    write(cfg, "tls.ini", "dhparam=dhparams.pem\n[redis]\nhost=127.0.0.1\n")
    warnings = load(cfg).warnings
    assert warnings == (
        "config/smtp.ini [headers] (line 3): a Haraka section outboundd does not use; ignored",
        "config/smtp.ini [main] daemonize (line 2): a Haraka setting outboundd does not use; "
        "ignored",
        "config/outbound.ini [main] pool_timeout (line 1): a Haraka setting; "
        "outboundd's is pool_idle_timeout; ignored",
        "config/tls.ini [redis] (line 2): a Haraka section outboundd does not use; ignored",
        "config/tls.ini [main] dhparam (line 1): a Haraka setting outboundd does not use; ignored",
    )


def test_repeated_key_warns(cfg: Path) -> None:
    write(cfg, "outbound.ini", "concurrency_max=5\nconcurrency_max=6\n")
    config = load(cfg)
    assert config.outbound.concurrency_max == 6
    assert config.warnings == (
        "config/outbound.ini [main] concurrency_max (line 2): set more than once; the last wins",
    )


def test_ipv6_enabled_is_read_as_inet_prefer(cfg: Path) -> None:
    write(cfg, "outbound.ini", "ipv6_enabled=true\n")
    config = load(cfg)
    assert config.outbound.inet_prefer == "v6"
    assert config.warnings == (
        "config/outbound.ini [main] ipv6_enabled: deprecated in Haraka; "
        "read as inet_prefer=v6, write that instead",
    )
    write(cfg, "outbound.ini", "ipv6_enabled=true\ninet_prefer=v4\n")
    config = load(cfg)
    assert config.outbound.inet_prefer == "v4"
    assert config.warnings == (
        "config/outbound.ini [main] ipv6_enabled (line 1): a Haraka setting replaced by "
        "inet_prefer; ignored",
    )


def test_haraka_legacy_files_warn(cfg: Path) -> None:
    write(cfg, "outbound.concurrency_max", "5\n")
    write(cfg, "databytes", "1000\n")
    config = load(cfg)
    assert config.outbound.concurrency_max == 100
    assert config.warnings == (
        "config/outbound.concurrency_max: Haraka's legacy file is not read; "
        "set concurrency_max in outbound.ini",
        "config/databytes: not read; set max_message_size in smtp.ini [main]",
    )


# --------------------------------------------------------------------------
# smtp.ini and HostPort


@pytest.mark.parametrize(
    ("text", "default", "host", "port", "shown"),
    [
        ("127.0.0.1:2525", None, "127.0.0.1", 2525, "127.0.0.1:2525"),
        ("[::1]:25", None, "::1", 25, "[::1]:25"),
        ("[::1]", 587, "::1", 587, "[::1]:587"),
        ("::1", 53, "::1", 53, "[::1]:53"),
        ("[0:0::1]:25", None, "::1", 25, "[::1]:25"),
        ("localhost", 25, "localhost", 25, "localhost:25"),
        ("MX.Example.ORG:2525", None, "mx.example.org", 2525, "mx.example.org:2525"),
        (" 127.0.0.1 ", 25, "127.0.0.1", 25, "127.0.0.1:25"),
    ],
)
def test_host_port_parse(text: str, default: int | None, host: str, port: int, shown: str) -> None:
    address = HostPort.parse(text, default)
    assert address == HostPort(host, port)
    assert str(address) == shown
    assert HostPort.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "the address is empty"),
        ("127.0.0.1", "no port given (write host:port)"),
        ("127.0.0.1:0", "port 0 is not between 1 and 65535"),
        ("127.0.0.1:65536", "port 65536 is not between 1 and 65535"),
        ("127.0.0.1:smtp", "port 'smtp' is not a number"),
        ("127.0.0.1:", "port '' is not a number"),
        ("[::1:25", "'[' without ']'"),
        ("[127.0.0.1]:25", "'127.0.0.1' in brackets is not an IPv6 address"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("fe80::zz:25", "not an IPv6 address (write an IPv6 address with a port as [addr]:port)"),
        ("bad_host:25", "'bad_host' is not an IP address or host name"),
        ("-bad.example:25", "'-bad.example' is not an IP address or host name"),
        ("192.0.2.256:25", "'192.0.2.256' is not an IP address or host name"),
    ],
)
def test_host_port_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        HostPort.parse(text)
    assert str(info.value) == reason


def test_host_port_require_ip() -> None:
    with pytest.raises(ValueError, match="'localhost' is not an IP address"):
        HostPort.parse("localhost:53", require_ip=True)
    assert HostPort.parse("127.0.0.1", 53, require_ip=True) == HostPort("127.0.0.1", 53)


def test_listen_tls_needs_a_key_pair(cfg: Path) -> None:
    write(cfg, "smtp.ini", "listen_tls=127.0.0.1:4650\n")
    assert error_of(cfg) == (
        "config/smtp.ini [main] listen_tls: needs a TLS key pair (config/tls_key.pem and "
        "config/tls_cert.pem, or key/cert in tls.ini)"
    )
    make_pki(cfg)
    assert load(cfg).smtp.listen_tls == [HostPort("127.0.0.1", 4650)]


def test_listen_lists(cfg: Path) -> None:
    make_pki(cfg)
    write(
        cfg,
        "smtp.ini",
        "[main]\nlisten=127.0.0.1:2525, [::1]:2525\nlisten_tls[]=127.0.0.1:4650\n"
        "listen_tls[]=[::1]\n",
    )
    smtp = load(cfg).smtp
    assert smtp.listen == [HostPort("127.0.0.1", 2525), HostPort("::1", 2525)]
    assert smtp.listen_tls == [HostPort("127.0.0.1", 4650), HostPort("::1", 465)]
    assert [str(a) for a in smtp.listen] == ["127.0.0.1:2525", "[::1]:2525"]


def test_listen_without_port_uses_25(cfg: Path) -> None:
    write(cfg, "smtp.ini", "listen=127.0.0.1\n")
    assert load(cfg).smtp.listen == [HostPort("127.0.0.1", 25)]


def test_empty_listen_means_no_plaintext_listener(cfg: Path) -> None:
    make_pki(cfg)
    write(cfg, "smtp.ini", "listen=\nlisten_tls=127.0.0.1:4650\n")
    smtp = load(cfg).smtp
    assert smtp.listen == []
    assert smtp.listen_tls == [HostPort("127.0.0.1", 4650)]


def test_smtp_values(cfg: Path) -> None:
    write(
        cfg,
        "smtp.ini",
        """\
[main]
max_message_size=0
max_recipients=5
auth_require_tls=false
inactivity_timeout=30
max_line_length=1000
auth_max_failures=1
auth_failure_delay=0.5
auth_disconnect_after=2
auth_block_seconds=0
constrain_sender=yes
""",
    )
    smtp = load(cfg).smtp
    assert smtp.max_message_size == 0
    assert smtp.max_recipients == 5
    assert smtp.auth_require_tls is False
    assert smtp.inactivity_timeout == 30
    assert smtp.max_line_length == 1000
    assert (smtp.auth_max_failures, smtp.auth_failure_delay) == (1, 0.5)
    assert (smtp.auth_disconnect_after, smtp.auth_block_seconds) == (2, 0)
    assert smtp.constrain_sender is True


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "listen=127.0.0.1:99999",
            "listen: '127.0.0.1:99999' is not a valid address: "
            "port 99999 is not between 1 and 65535",
        ),
        (
            "listen=127.0.0.1:2525,[::1",
            "listen: '[::1' is not a valid address: '[' without ']'",
        ),
        (
            "listen=127.0.0.1:2525,127.0.0.1:2525",
            "listen: lists 127.0.0.1:2525 more than once",
        ),
        (
            "listen=127.0.0.1:2525\nlisten_tls=127.0.0.1:2525",
            "listen_tls: 127.0.0.1:2525 is also in listen",
        ),
        (
            "listen=my_host:25",
            "listen: 'my_host:25' is not a valid address: "
            "'my_host' is not an IP address or host name",
        ),
        ("max_message_size=-1", "max_message_size: '-1' is not between 0 and 1099511627776"),
        ("max_message_size=10MB", "max_message_size: '10MB' is not an integer"),
        ("max_recipients=0", "max_recipients: '0' is not between 1 and 1000000"),
        ("max_line_length=512", "max_line_length: '512' is not between 1000 and 1048576"),
        ("auth_disconnect_after=0", "auth_disconnect_after: '0' is not between 1 and 1000000"),
        ("auth_require_tls=required", "auth_require_tls: 'required' is not a boolean"),
        ("inactivity_timeout=0", "inactivity_timeout: '0' must be greater than 0"),
    ],
)
def test_smtp_errors(cfg: Path, line: str, message: str) -> None:
    write(cfg, "smtp.ini", f"[main]\n{line}\n")
    assert error_of(cfg).startswith(f"config/smtp.ini [main] {message}")


# --------------------------------------------------------------------------
# Paths


def test_queue_dir_resolves_against_base_dir(cfg: Path) -> None:
    write(cfg, "outbound.ini", "queue_dir=var/spool\n")
    assert load(cfg).outbound.queue_dir == cfg.parent / "var" / "spool"
    write(cfg, "outbound.ini", "queue_dir=../shared/q\n")
    assert load(cfg).outbound.queue_dir == cfg.parent.parent / "shared" / "q"
    write(cfg, "outbound.ini", "queue_dir=/srv/outboundd/queue\n")
    assert load(cfg).outbound.queue_dir == Path("/srv/outboundd/queue")


def test_base_dir_is_independent_of_cwd(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(cfg, "outbound.ini", "queue_dir=q\n")
    monkeypatch.chdir("/")
    config = load_config(cfg)
    assert config.base_dir == cfg.parent
    assert config.outbound.queue_dir == cfg.parent / "q"
    assert config.config_dir == cfg


def test_tls_pair_found_by_default(cfg: Path) -> None:
    make_pki(cfg)
    tls = load(cfg).tls
    assert tls.key == cfg / "tls_key.pem"
    assert tls.cert == cfg / "tls_cert.pem"
    assert tls.key.is_absolute()


def test_tls_paths_resolve_against_base_dir(cfg: Path) -> None:
    make_pki(cfg.parent / "certs")
    write(cfg, "tls.ini", "key=certs/tls_key.pem\ncert=certs/tls_cert.pem\n")
    tls = load(cfg).tls
    assert tls.key == cfg.parent / "certs" / "tls_key.pem"
    assert tls.cert == cfg.parent / "certs" / "tls_cert.pem"


def test_tls_paths_haraka_style_inside_config_dir(cfg: Path) -> None:
    pki = make_pki(cfg.parent / "tmp-pki")
    shutil.copy(pki.key_pem, cfg / "server.key")
    shutil.copy(pki.cert_pem, cfg / "server.crt")
    write(cfg, "tls.ini", "key=server.key\ncert=server.crt\n")
    tls = load(cfg).tls
    assert (tls.key, tls.cert) == (cfg / "server.key", cfg / "server.crt")


def test_tls_explicit_file_missing(cfg: Path) -> None:
    write(cfg, "tls.ini", "[main]\nkey=nope.pem\n")
    assert error_of(cfg) == (
        "config/tls.ini [main] key: 'nope.pem': no such file (nope.pem or config/nope.pem)"
    )


def test_tls_half_pair_by_default_warns(cfg: Path) -> None:
    pki = make_pki(cfg.parent / "pki")
    shutil.copy(pki.key_pem, cfg / "tls_key.pem")
    config = load(cfg)
    assert (config.tls.key, config.tls.cert) == (None, None)
    assert config.warnings == (
        "config/tls.ini: found tls_key.pem but no tls_cert.pem in config; TLS is not offered",
    )


def test_tls_half_pair_explicit_is_an_error(cfg: Path) -> None:
    make_pki(cfg.parent / "pki")
    write(cfg, "tls.ini", "cert=pki/tls_cert.pem\n")
    assert error_of(cfg) == (
        "config/tls.ini [main] cert: is set but no key file was found; set both"
    )


def test_tls_broken_pair_is_an_error(cfg: Path) -> None:
    make_pki(cfg)
    other = make_pki(cfg.parent / "other")
    shutil.copy(other.key_pem, cfg / "tls_key.pem")
    message = error_of(cfg)
    assert message.startswith(
        "config/tls.ini [main] cert: config/tls_cert.pem with key config/tls_key.pem "
        "cannot be loaded ("
    )
    assert message.endswith("; an unencrypted PEM key and its certificate are expected)")
    write(cfg, "tls_key.pem", "not a key\n")
    assert error_of(cfg).startswith("config/tls.ini [main] cert: config/tls_cert.pem with key")


def test_tls_settings(cfg: Path) -> None:
    write(
        cfg,
        "tls.ini",
        """\
minVersion=tlsv1.2
ciphers=HIGH:!aNULL
rejectUnauthorized=true

[outbound]
force_tls=true
force_tls_hosts[]=MX1.example.org
force_tls_hosts[]=mx2.example.org, 192.0.2.1
no_tls_hosts=broken.example, old.example
""",
    )
    tls = load(cfg).tls
    assert tls.main.min_version == "TLSv1.2"
    assert tls.main.ciphers == "HIGH:!aNULL"
    # [outbound] falls back to [main], as in Haraka
    assert tls.outbound.min_version == "TLSv1.2"
    assert tls.outbound.ciphers == "HIGH:!aNULL"
    assert tls.outbound.reject_unauthorized is True
    assert tls.outbound.force_tls is True
    assert tls.outbound.force_tls_hosts == ["mx1.example.org", "mx2.example.org", "192.0.2.1"]
    assert tls.outbound.no_tls_hosts == ["broken.example", "old.example"]


def test_tls_outbound_overrides_main(cfg: Path) -> None:
    write(
        cfg,
        "tls.ini",
        "minVersion=TLSv1.2\nrejectUnauthorized=yes\n"
        "[outbound]\nminVersion=TLSv1.3\nrejectUnauthorized=no\n",
    )
    tls = load(cfg).tls
    assert (tls.main.min_version, tls.outbound.min_version) == ("TLSv1.2", "TLSv1.3")
    assert tls.outbound.reject_unauthorized is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "minVersion=TLSv1.4",
            "[main] minVersion: 'TLSv1.4' is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3",
        ),
        (
            "[outbound]\nminVersion=SSLv3",
            "[outbound] minVersion: 'SSLv3' is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3",
        ),
        (
            "ciphers=NOT-A-CIPHER",
            "[main] ciphers: 'NOT-A-CIPHER' is not a cipher list OpenSSL accepts",
        ),
        ("[outbound]\nforce_tls=always", "[outbound] force_tls: 'always' is not a boolean"),
    ],
)
def test_tls_errors(cfg: Path, text: str, message: str) -> None:
    write(cfg, "tls.ini", text + "\n")
    assert error_of(cfg).startswith(f"config/tls.ini {message}")


# --------------------------------------------------------------------------
# Logging


@pytest.mark.parametrize(
    ("word", "level"),
    [
        ("info", 6),
        ("INFO", 6),
        ("LOGINFO", 6),
        ("logdebug", 7),
        ("data", 9),
        ("protocol", 8),
        ("notice", 5),
        ("warn", 4),
        ("WARNING", 4),
        ("error", 3),
        ("crit", 2),
        ("alert", 1),
        ("emerg", 0),
        ("9", 9),
        ("0", 0),
    ],
)
def test_log_levels(cfg: Path, word: str, level: int) -> None:
    write(cfg, "log.ini", f"[main]\nlevel={word}\n")
    assert load(cfg).log.level == level
    (cfg / "log.ini").unlink()
    write(cfg, "loglevel", f"# Haraka's one-line file\n{word}\n")
    assert load(cfg).log.level == level


def test_log_ini_wins_over_one_line_files(cfg: Path) -> None:
    write(cfg, "loglevel", "debug\n")
    write(cfg, "log_timestamps", "yes\n")
    log = load(cfg).log
    assert (log.level, log.timestamps) == (7, True)
    write(cfg, "log.ini", "[main]\nlevel=warn\ntimestamps=false\nformat=json\n")
    log = load(cfg).log
    assert (log.level, log.timestamps, log.format) == (4, False, "json")
    write(cfg, "log.ini", "[main]\nformat=logfmt\n")
    log = load(cfg).log
    assert (log.level, log.timestamps, log.format) == (7, True, "logfmt")


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (
            "log.ini",
            "level=loud",
            "config/log.ini [main] level: 'loud' is not a log level (DATA, PROTOCOL, DEBUG, "
            "INFO, NOTICE, WARN, ERROR, CRIT, ALERT, EMERG or 9-0)",
        ),
        ("log.ini", "level=10", "config/log.ini [main] level: '10' is not a log level"),
        (
            "log.ini",
            "timestamps=sometimes",
            "config/log.ini [main] timestamps: 'sometimes' is not a boolean",
        ),
        (
            "log.ini",
            "format=xml",
            "config/log.ini [main] format: 'xml' is not one of default, logfmt, json",
        ),
        ("loglevel", "chatty", "config/loglevel: 'chatty' is not a log level"),
        ("log_timestamps", "perhaps", "config/log_timestamps: 'perhaps' is not a boolean"),
    ],
)
def test_log_errors(cfg: Path, file: str, text: str, message: str) -> None:
    write(cfg, file, text + "\n")
    assert error_of(cfg).startswith(message)


# --------------------------------------------------------------------------
# me, plugins, relay_acl_allow, auth users, bounce templates


def test_me_first_line(cfg: Path) -> None:
    write(cfg, "me", "# comment\n\nrelay.example.org\nignored.example\n")
    assert load(cfg).me == "relay.example.org"


def test_me_invalid(cfg: Path) -> None:
    write(cfg, "me", "# name\nbad name!\n")
    assert error_of(cfg) == (
        "config/me line 2: 'bad name!' is not a host name (letters, digits, '-' and '.')"
    )
    write(cfg, "me", "127.0.0.1\n")
    assert error_of(cfg).startswith("config/me line 1: '127.0.0.1' is not a host name")


def test_me_defaults_to_fqdn(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (cfg / "me").unlink()
    monkeypatch.setattr("socket.getfqdn", lambda: "box.example.net")
    assert load(cfg).me == "box.example.net"
    write(cfg, "me", "\n")
    assert load(cfg).me == "box.example.net"
    monkeypatch.setattr("socket.getfqdn", lambda: "weird_name")
    assert error_of(cfg) == (
        "config/me: is missing and this host's name 'weird_name' is not a usable host name; "
        "write this server's name into it"
    )


def test_plugins(cfg: Path) -> None:
    write(cfg, "plugins", "# comment\n\nauth_flat_file\n  my_plugin  # trailing\nauth_flat_file\n")
    config = load(cfg)
    assert config.plugins == ["auth_flat_file", "my_plugin"]
    assert config.warnings == (
        "config/plugins line 5: auth_flat_file is listed twice; loaded once",
    )


def test_plugins_bad_name(cfg: Path) -> None:
    write(cfg, "plugins", "# list\nauth/flat_file\n")
    assert error_of(cfg) == (
        "config/plugins line 2: 'auth/flat_file' is not a plugin name "
        "(letters, digits, '_', '-', '.') (did you mean auth_flat_file?)"
    )


def test_relay_acl(cfg: Path) -> None:
    write(
        cfg,
        "relay_acl_allow",
        "# loopback\n127.0.0.0/8\n::1\n192.0.2.7  # one host\n\n2001:db8::/32\n198.51.100.0/24\n",
    )
    assert load(cfg).relay_acl_allow == [
        IPv4Network("127.0.0.0/8"),
        IPv6Network("::1/128"),
        IPv4Network("192.0.2.7/32"),
        IPv6Network("2001:db8::/32"),
        IPv4Network("198.51.100.0/24"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "127.0.0.0/8\nbanana\n",
            "config/relay_acl_allow line 2: 'banana' is not an IP address or CIDR network "
            "(like 192.0.2.0/24)",
        ),
        (
            "198.51.100.1/24\n",
            "config/relay_acl_allow line 1: '198.51.100.1/24' has host bits set "
            "(did you mean 198.51.100.0/24?)",
        ),
        (
            "# x\n::1/129\n",
            "config/relay_acl_allow line 2: '::1/129' is not an IP address or CIDR network "
            "(like 192.0.2.0/24)",
        ),
        (
            "127.0.0.0/8 198.51.100.0/24\n",
            "config/relay_acl_allow line 1: '127.0.0.0/8 198.51.100.0/24' is not an IP address "
            "or CIDR network (like 192.0.2.0/24)",
        ),
    ],
)
def test_relay_acl_errors(cfg: Path, text: str, message: str) -> None:
    write(cfg, "relay_acl_allow", text)
    assert error_of(cfg) == message


def test_relay_acl_open_relay_warns(cfg: Path) -> None:
    write(cfg, "relay_acl_allow", "0.0.0.0/0\n")
    config = load(cfg)
    assert config.relay_acl_allow == [IPv4Network("0.0.0.0/0")]
    assert config.warnings == (
        "config/relay_acl_allow line 1: 0.0.0.0/0 lets every IPv4 client relay without AUTH "
        "(an open relay)",
    )


def test_auth_users(cfg: Path) -> None:
    hashed = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="
    write(
        cfg,
        "auth_flat_file.ini",
        f"[core]\nmethods=PLAIN,LOGIN\n\n[users]\n; comment\nalice = {hashed}\n"
        "bob@example.org=plain secret\n",
    )
    config = load(cfg)
    assert config.auth_users == {"alice": hashed, "bob@example.org": "plain secret"}
    assert config.warnings == (
        "config/auth_flat_file.ini [users] bob@example.org: plaintext password; store a hash "
        "with `outboundctl user add bob@example.org --password-stdin`",
    )


def test_bounce_templates(cfg: Path) -> None:
    write(cfg, "outbound.bounce_message", "Reason: {reason}\n")
    write(cfg, "outbound.bounce_message_html", "<p>{reason}</p>\n")
    (cfg / "outbound.bounce_message_image").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    bounce = load(cfg).bounce
    assert bounce.text == "Reason: {reason}\n"
    assert bounce.html == "<p>{reason}</p>\n"
    assert bounce.image == b"\x89PNG\r\n\x1a\n\x00\xff"


def test_bounce_template_must_be_utf8(cfg: Path) -> None:
    (cfg / "outbound.bounce_message").write_bytes(b"line one\nline \xff two\n")
    assert error_of(cfg) == "config/outbound.bounce_message line 2: is not valid UTF-8 text"


# --------------------------------------------------------------------------
# ConfigError


def test_config_error_shapes() -> None:
    assert str(ConfigError("config/a.ini", "bad", section="main", key="k")) == (
        "config/a.ini [main] k: bad"
    )
    assert str(ConfigError("config/plugins", "bad", line=3)) == "config/plugins line 3: bad"
    assert str(ConfigError("config/me", "bad")) == "config/me: bad"
    error = ConfigError("f", "two\nlines", key="k")
    assert str(error) == "f k: two lines"
    assert (error.file, error.key, error.section, error.line) == ("f", "k", None, None)


# --------------------------------------------------------------------------
# Hot reload


def test_load_outbound_sees_a_changed_file(cfg: Path) -> None:
    path = cfg / "outbound.ini"
    path.write_text("disabled=false\nconcurrency_max=10\n")
    first = load_outbound(cfg, cfg.parent)
    assert (first.disabled, first.concurrency_max) == (False, 10)
    assert first.temp_fail_intervals == HARAKA_DEFAULT

    path.write_text("disabled=true\nconcurrency_max=3\ntemp_fail_intervals=10s, 1m*2\n")
    second = load_outbound(cfg, cfg.parent)
    assert (second.disabled, second.concurrency_max) == (True, 3)
    assert second.temp_fail_intervals == (10, 60, 60)
    assert second.queue_dir == cfg.parent / "queue"
    assert first.disabled is False  # the old object is untouched (frozen)

    path.write_text("concurrency_max=many\n")
    with pytest.raises(ConfigError) as info:
        load_outbound(Path("config"), Path("."))
    assert str(info.value) == "config/outbound.ini [main] concurrency_max: 'many' is not an integer"


def test_load_outbound_matches_load_config(cfg: Path) -> None:
    write(cfg, "outbound.ini", "queue_dir=spool\nnameservers=127.0.0.1:5353\nmaxTempFailures=4\n")
    config = load(cfg)
    assert load_outbound(config.config_dir, config.base_dir) == config.outbound


# --------------------------------------------------------------------------
# The shipped config/


def test_shipped_config_loads_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "config")
    assert config.warnings == ()
    assert config.me == "outboundd.localhost"
    assert config.smtp.listen == [HostPort("127.0.0.1", 2525)]
    assert config.smtp.listen_tls == []
    assert config.outbound.queue_dir == REPO / "queue"
    assert config.outbound.nameservers == []
    assert config.outbound.temp_fail_intervals == HARAKA_DEFAULT
    assert config.outbound.received_header == "outboundd"
    assert config.plugins == ["auth_flat_file"]
    assert config.relay_acl_allow == [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]
    assert config.auth_users == {}
    assert (config.log.level, config.log.format, config.log.timestamps) == (6, "default", False)
    assert config.bounce.text is not None
    assert "{reason}" in config.bounce.text
    assert config.bounce.html is None and config.bounce.image is None
    if not (REPO / "config" / "tls_key.pem").exists():
        assert (config.tls.key, config.tls.cert) == (None, None)


def test_shipped_config_has_only_loopback_addresses() -> None:
    """Every IP address written in the shipped files, commented or not, is
    loopback or a documentation address; only loopback ones are active."""
    candidate = re.compile(r"\[?([0-9A-Fa-f:.]*[:.][0-9A-Fa-f:.]+)\]?(?:/\d+)?")
    documentation: list[IPv4Network | IPv6Network] = [
        IPv4Network("192.0.2.0/24"),
        IPv6Network("2001:db8::/32"),
    ]
    for path in sorted((REPO / "config").iterdir()):
        if not path.is_file() or path.suffix == ".pem":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            active = not line.lstrip().startswith((";", "#"))
            for match in candidate.finditer(line):
                text = match.group(1).rstrip(".:")
                try:
                    address = ipaddress.ip_address(text.split("%")[0])
                except ValueError:
                    continue
                where = f"{path.name}:{number}: {text}"
                if active:
                    assert address.is_loopback, where
                else:
                    documented = any(
                        address.version == n.version and address in n for n in documentation
                    )
                    assert address.is_loopback or documented, where


def test_shipped_files_are_commented() -> None:
    names = ("me", "smtp.ini", "outbound.ini", "tls.ini", "log.ini", "plugins")
    for name in (*names, "relay_acl_allow", "auth_flat_file.ini"):
        text = (REPO / "config" / name).read_text()
        assert re.search(r"^\s*[;#]", text, re.MULTILINE), name


def test_pool_cap_follows_domain_concurrency_unless_set(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "outbound.ini").write_text("[main]\ndomain_concurrency_max=25\n")
    assert load_config(cfg).outbound.pool_max_per_host == 25
    (cfg / "outbound.ini").write_text("[main]\ndomain_concurrency_max=25\npool_max_per_host=3\n")
    assert load_config(cfg).outbound.pool_max_per_host == 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1), ("2", 2), ("cpus", max(1, min(os.cpu_count() or 1, 64))), ("CPUs", None)],
)
def test_nodes_is_a_count_or_cpus(cfg: Path, value: str, expected: int | None) -> None:
    write(cfg, "smtp.ini", f"[main]\nnodes={value}\n")
    want = expected if expected is not None else max(1, min(os.cpu_count() or 1, 64))
    assert load(cfg).smtp.nodes == want


@pytest.mark.parametrize("value", ["0", "65", "two", "-1"])
def test_bad_nodes_names_file_key_and_value(cfg: Path, value: str) -> None:
    write(cfg, "smtp.ini", f"[main]\nnodes={value}\n")
    with pytest.raises(ConfigError, match=rf"smtp.ini \[main\] nodes.*{value}"):
        load(cfg)


def test_nodes_defaults_to_one(cfg: Path) -> None:
    assert load(cfg).smtp.nodes == 1


@pytest.mark.parametrize("key", [k for k in SESSION_TIMEOUTS if k != "connect_timeout"])
def test_session_timeouts_accept_their_documented_range(cfg: Path, key: str) -> None:
    """Each wait's bound: greater than 0, at most a year (docs/configuration.md)."""
    for good, value in (("0.05", 0.05), ("31536000", 31536000.0)):
        write(cfg, "outbound.ini", f"[main]\n{key}={good}\n")
        assert getattr(load(cfg).outbound, key) == value
    for bad, message in (
        ("0", "must be greater than 0"),
        ("31536001", "is more than 31536000 seconds (a year)"),
        ("-1", "is not a number of seconds"),
    ):
        write(cfg, "outbound.ini", f"[main]\n{key}={bad}\n")
        assert error_of(cfg).startswith(f"config/outbound.ini [main] {key}: '{bad}' {message}")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("auth_max_failures=0", None),
        ("auth_max_failures=1000000", None),
        ("auth_max_failures=-1", "auth_max_failures: '-1' is not between 0 and 1000000"),
        ("auth_max_failures=1000001", "auth_max_failures: '1000001' is not between 0 and 1000000"),
        ("auth_disconnect_after=1", None),
        ("auth_disconnect_after=1000000", None),
        ("auth_disconnect_after=0", "auth_disconnect_after: '0' is not between 1 and 1000000"),
        (
            "auth_disconnect_after=1000001",
            "auth_disconnect_after: '1000001' is not between 1 and 1000000",
        ),
        ("auth_failure_delay=0", None),
        ("auth_failure_delay=31536000", None),
        ("auth_failure_delay=-1", "auth_failure_delay: '-1' is not a number of seconds"),
        ("auth_failure_delay=31536001", "auth_failure_delay: '31536001' is more than"),
        ("auth_block_seconds=0", None),
        ("auth_block_seconds=31536000", None),
        ("auth_block_seconds=nan", "auth_block_seconds: 'nan' is not a number of seconds"),
        ("auth_block_seconds=31536001", "auth_block_seconds: '31536001' is more than"),
    ],
)
def test_auth_throttle_keys_accept_what_the_throttle_accepts(
    cfg: Path, line: str, error: str | None
) -> None:
    """Every auth_* value that loads makes a throttle; every other one is a one-line error."""
    from outboundd.plugins.auth_flat_file import AuthThrottle

    write(cfg, "smtp.ini", f"[main]\n{line}\n")
    if error is not None:
        assert error_of(cfg).startswith(f"config/smtp.ini [main] {error}")
        return
    smtp = load(cfg).smtp
    throttle = AuthThrottle(
        max_failures=smtp.auth_max_failures,
        failure_delay=smtp.auth_failure_delay,
        disconnect_after=smtp.auth_disconnect_after,
        block_seconds=smtp.auth_block_seconds,
    )
    assert throttle.disconnect_after >= 1
