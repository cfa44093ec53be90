"""DKIM keys on disk, ``dkim.ini``, and ``outboundctl dkim keygen|show``."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from outboundd import ctl
from outboundd.config import ConfigError, load_config
from outboundd.dkimkeys import DkimKeyError, generate_key, load_keys, public_key_text

DOMAIN = "mail.example"


def run_ctl(config_dir: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = ctl.main(["-c", str(config_dir), "dkim", *args], out=out)
    return code, out.getvalue()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.mkdir()
    (path / "me").write_text("relay.mail.example\n")
    return path


def record_p(text: str) -> str:
    value = "".join(re.findall(r'"([^"]*)"', text))
    match = re.search(r"p=([A-Za-z0-9+/=]+)", value)
    assert match is not None, text
    return match[1]


def test_keygen_writes_private_key_0600_and_prints_the_record(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_ctl(config_dir, "keygen", "Mail.Example", "--selector", "s1")
    assert code == 0, capsys.readouterr().err
    domain_dir = config_dir / "dkim" / DOMAIN
    assert stat.S_IMODE((domain_dir / "private").stat().st_mode) == 0o600
    assert (domain_dir / "selector").read_text() == "s1\n"
    assert 's1._domainkey.mail.example. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    assert all(len(chunk) <= 255 for chunk in re.findall(r'"([^"]*)"', out))
    [key] = load_keys(config_dir / "dkim", None)[DOMAIN]
    assert key.type == "rsa" and key.private_key.key_size == 2048  # type: ignore[union-attr]
    assert record_p(out) == public_key_text(key)

    code, out = run_ctl(config_dir, "keygen", DOMAIN, "--type", "ed25519", "--selector", "e1")
    assert code == 0
    assert stat.S_IMODE((domain_dir / "ed25519.private").stat().st_mode) == 0o600
    assert 'e1._domainkey.mail.example. IN TXT ( "v=DKIM1; k=ed25519; p=' in out
    rsa_key, ed_key = load_keys(config_dir / "dkim", None)[DOMAIN]
    assert (rsa_key.selector, ed_key.selector, ed_key.type) == ("s1", "e1", "ed25519")
    assert len(public_key_text(ed_key)) == 44  # 32 raw bytes, base64 (RFC 8463)

    code, out = run_ctl(config_dir, "show", DOMAIN)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("s1._domainkey") and "k=ed25519" in lines[1]
    assert record_p(lines[1]) == public_key_text(ed_key)


def test_keygen_never_replaces_a_key_and_selectors_stay_apart(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_ctl(config_dir, "keygen", DOMAIN, "--type", "ed25519", "--selector", "a")[0] == 0
    before = (config_dir / "dkim" / DOMAIN / "ed25519.private").read_bytes()
    capsys.readouterr()
    assert run_ctl(config_dir, "keygen", DOMAIN, "--type", "ed25519")[0] == 1
    assert "already has an ed25519 key" in capsys.readouterr().err
    assert (config_dir / "dkim" / DOMAIN / "ed25519.private").read_bytes() == before
    assert run_ctl(config_dir, "keygen", DOMAIN, "--selector", "a")[0] == 1
    assert "selector a is already used" in capsys.readouterr().err
    assert not (config_dir / "dkim" / DOMAIN / "private").exists()


def test_default_selector_is_month_and_year(config_dir: Path) -> None:
    code, out = run_ctl(config_dir, "keygen", DOMAIN)
    assert code == 0
    assert re.match(r"[a-z]{3}\d{4}\._domainkey", out.splitlines()[-1])
    code, out = run_ctl(config_dir, "keygen", DOMAIN, "--type", "ed25519")
    assert code == 0 and re.match(r"[a-z]{3}\d{4}ed\._domainkey", out.splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (("show", DOMAIN), 1, "no DKIM key for mail.example"),
        (("show", "bad_domain!"), 1, "is not a domain name"),
        (("keygen", DOMAIN, "--selector", "no spaces"), 1, "is not a selector"),
    ],
)
def test_ctl_errors_are_one_line(
    config_dir: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    error: str,
) -> None:
    assert run_ctl(config_dir, *args)[0] == code
    err = capsys.readouterr().err
    assert error in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_ctl_usage_error_exits_2(config_dir: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        run_ctl(config_dir, "keygen", DOMAIN, "--type", "dsa")
    assert exc.value.code == 2


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"private": b"not a key"}, "private: not a PEM private key"),
        ({"private": "ec"}, "not an RSA or Ed25519 key"),
        ({"private": "encrypted"}, "it is encrypted"),
        ({"ed25519.private": "rsa", "ed25519.selector": b"e\n"}, "holds an RSA key"),
        ({"private": "ed", "ed25519.private": "ed", "selector": b"a\n"}, "at most one key"),
        ({"private": "ed"}, "selector: missing"),
        ({"private": "ed", "selector": b"bad selector\n"}, "is not a selector"),
    ],
)
def test_unusable_key_files_are_named(
    tmp_path: Path, files: dict[str, bytes | str], error: str
) -> None:
    source = tmp_path / "source"
    rsa_key = generate_key(source, "a.example", "r", "rsa")
    ed_key = generate_key(source, "a.example", "e", "ed25519")
    made = {
        "rsa": rsa_key.path.read_bytes(),
        "ed": ed_key.path.read_bytes(),
        "ec": ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "encrypted": ed_key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    }
    dkim_dir = tmp_path / "dkim"
    for name, data in files.items():
        _write(dkim_dir / DOMAIN / name, made[data] if isinstance(data, str) else data)
    with pytest.raises(DkimKeyError, match=re.escape(error)):
        load_keys(dkim_dir, None)


def test_dkim_ini_enables_signing_and_loads_keys(config_dir: Path) -> None:
    generate_key(config_dir / "dkim", DOMAIN, "s1", "rsa")
    spare = generate_key(config_dir.parent / "spare", "x.example", "x", "ed25519")
    _write(config_dir / "dkim" / "other.example" / "ed25519.private", spare.path.read_bytes())
    (config_dir / "dkim.ini").write_text(
        "[sign]\nenabled = yes\nselector = dflt\ndomain = mail.example\n"
        "headers = Subject: To; Date\nkey_domain = auth_user\n[canon]\nbody = relaxed\n"
    )
    (config_dir / "dkim.private.key").write_text("old Haraka key\n")
    config = load_config(config_dir)
    dkim = config.dkim
    assert dkim.enabled and dkim.domain == DOMAIN and dkim.key_domain == "auth_user"
    assert dkim.headers == ("From", "Subject", "To", "Date")  # From is always signed
    assert sorted(dkim.keys) == ["mail.example", "other.example"]
    assert dkim.keys["other.example"][0].selector == "dflt"  # no selector file
    warnings = "\n".join(config.warnings)
    assert "dkim.ini [canon]" in warnings and "relaxed/relaxed" in warnings
    assert "dkim.private.key: Haraka's single-domain key file is not read" in warnings


@pytest.mark.parametrize(
    ("ini", "error"),
    [
        ("[sign]\nenabled = true\nheaders = From, Bcc\n", "bcc must not be signed"),
        ("[sign]\nenabled = true\ndomain = nokey.example\n", "nokey.example has no key"),
        ("[sign]\nenabled = maybe\n", "enabled"),
        ("[sign]\nenabled = true\nkey_domain = envelope\n", "is not one of from, auth_user"),
    ],
)
def test_dkim_ini_errors(config_dir: Path, ini: str, error: str) -> None:
    (config_dir / "dkim.ini").write_text(ini)
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(config_dir)


def test_broken_key_stops_start_only_when_signing_is_enabled(config_dir: Path) -> None:
    _write(config_dir / "dkim" / DOMAIN / "private", b"garbage")
    (config_dir / "dkim.ini").write_text("[sign]\nenabled = false\n")
    assert load_config(config_dir).dkim.keys == {}
    (config_dir / "dkim.ini").write_text("[sign]\nenabled = true\n")
    with pytest.raises(ConfigError, match=re.escape("mail.example/private: not a PEM private key")):
        load_config(config_dir)


def test_config_with_keys_pickles_for_child_processes(config_dir: Path) -> None:
    """The daemon hands its configuration to children by pickle (children.config_memfd)."""
    import pickle

    generate_key(config_dir / "dkim", DOMAIN, "s1", "rsa")
    generate_key(config_dir / "dkim", DOMAIN, "e1", "ed25519")
    (config_dir / "dkim.ini").write_text("[sign]\nenabled = true\n")
    config = load_config(config_dir)
    copy = pickle.loads(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
    for before, after in zip(config.dkim.keys[DOMAIN], copy.dkim.keys[DOMAIN], strict=True):
        assert (after.domain, after.selector, after.type, after.path) == (
            before.domain,
            before.selector,
            before.type,
            before.path,
        )
        assert public_key_text(after) == public_key_text(before)
