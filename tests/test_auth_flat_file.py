"""auth_flat_file: hashes, verification, the users file, and AUTH throttling."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from outboundd.plugins import auth_flat_file as aff
from outboundd.plugins.auth_flat_file import (
    Admission,
    AuthThrottle,
    InvalidPassword,
    InvalidUserName,
    MemoryThrottleStore,
    ThrottleVerdict,
    UserStore,
    add_user,
    delete_user,
    hash_password,
    is_plaintext,
    list_users,
    read_users,
    stored_problem,
    verify_password,
)

SECRET = "correct horse battery staple"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(SECRET)


# --------------------------------------------------------------------------
# Hashes


def test_hash_format(stored: str) -> None:
    scheme, n, r, p, salt, key = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(key)) == 32
    assert SECRET not in stored


def test_hash_is_salted() -> None:
    assert hash_password("same") != hash_password("same")


def test_roundtrip_and_wrong_password(stored: str) -> None:
    assert verify_password(stored, SECRET)
    assert not verify_password(stored, SECRET + "x")
    assert not verify_password(stored, "")
    assert not verify_password(stored, SECRET.upper())


def test_hash_matches_hashlib_scrypt(stored: str) -> None:
    _, n, r, p, salt, key = stored.split("$")
    expected = hashlib.scrypt(
        SECRET.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32
    )
    assert base64.b64decode(key) == expected


def test_scrypt_with_other_parameters_verifies() -> None:
    salt = os.urandom(8)
    key = hashlib.scrypt(b"pw", salt=salt, n=1024, r=4, p=2, dklen=64)
    value = f"scrypt$1024$4$2${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"
    assert verify_password(value, "pw")
    assert value.endswith("==")  # a 64-byte key needs padding...
    assert verify_password(value.rstrip("="), "pw")  # ...which may be left out
    assert not verify_password(value, "pW")


def pbkdf2_value(password: str, salt: str, iterations: int) -> str:
    key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(key).decode()}"


def test_pbkdf2_sha256_verifies() -> None:
    # Django's layout: the salt is used as text, the key is padded base64.
    value = pbkdf2_value("s3cret", "NaCl4Salt", 1000)
    assert verify_password(value, "s3cret")
    assert not verify_password(value, "s3cre")
    assert not is_plaintext(value)
    assert stored_problem(value) is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "$",
        "scrypt$",
        "scrypt$16384$8$1$c2FsdA==",  # no hash part
        "scrypt$16384$8$1$c2FsdA==$not base64!",
        "scrypt$16385$8$1$c2FsdHNhbHQ=$" + "A" * 44,  # N not a power of two
        "scrypt$0$8$1$c2FsdHNhbHQ=$" + "A" * 44,
        "scrypt$1048576$64$1$c2FsdHNhbHQ=$" + "A" * 44,  # r out of bounds
        "scrypt$16384$8$1$$" + "A" * 44,  # empty salt
        "scrypt$16384$8$1$c2FsdA==$QUFB",  # 3-byte key: too short
        "scrypt$-1$8$1$c2FsdA==$" + "A" * 44,
        "scrypt$١٦$8$1$c2FsdA==$" + "A" * 44,  # non-ASCII digits
        "pbkdf2_sha256$abc$salt$" + "A" * 44,
        "pbkdf2_sha256$0$salt$" + "A" * 44,
        "pbkdf2_sha256$99999999999$salt$" + "A" * 44,
        "pbkdf2_sha256$1000$$" + "A" * 44,
        "pbkdf2_sha256$1000$salt",
        "bcrypt$2b$12$abcdefghijklmnopqrstuv",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
        "pa$$word",
    ],
)
def test_malformed_or_unknown_never_matches_and_never_raises(bad: str) -> None:
    assert verify_password(bad, bad) is False
    assert verify_password(bad, "password") is False
    assert not is_plaintext(bad)
    problem = stored_problem(bad)
    assert problem is not None and "cannot log in" in problem


def test_non_text_inputs_do_not_raise(stored: str) -> None:
    assert verify_password(None, "x") is False  # type: ignore[arg-type]
    assert verify_password(stored, None) is False  # type: ignore[arg-type]
    assert verify_password(stored, "\udcff") is False  # lone surrogate: not encodable


def test_plaintext_fallback() -> None:
    assert is_plaintext("password1")
    assert verify_password("password1", "password1")
    assert not verify_password("password1", "password")
    assert not verify_password("password1", "password12")
    assert not verify_password("password1", "")
    problem = stored_problem("password1")
    assert problem is not None and "plaintext" in problem and "password1" not in problem
    assert not is_plaintext("")


def test_problem_text_never_contains_the_value() -> None:
    for value in ("secretscheme$topsecret", "scrypt$1$2$3$topsecret$x"):
        problem = stored_problem(value)
        assert problem is not None and "topsecret" not in problem


def test_hash_password_rejects_unstorable_passwords() -> None:
    with pytest.raises(InvalidPassword, match="empty"):
        hash_password("")
    with pytest.raises(InvalidPassword, match="NUL") as info:
        hash_password("abc\x00hidden-part")
    assert "hidden-part" not in str(info.value)


# --------------------------------------------------------------------------
# The file

EXAMPLE = """\
; outboundd users
[core]
methods = PLAIN,LOGIN

[users]
# the admin
alice = password1
bob@example.com = {bob}
; trailing comment

[other]
alice = not-a-user
"""


@pytest.fixture
def users_file(tmp_path: Path, stored: str) -> Path:
    path = tmp_path / "auth_flat_file.ini"
    path.write_text(EXAMPLE.format(bob=stored))
    return path


def test_read_and_list(users_file: Path, stored: str) -> None:
    assert read_users(users_file) == {"alice": "password1", "bob@example.com": stored}
    assert list_users(users_file) == ["alice", "bob@example.com"]
    assert list_users(users_file.parent / "missing.ini") == []


def test_add_new_user_keeps_everything_else(users_file: Path, stored: str) -> None:
    assert add_user(users_file, "carol@example.org", "pw-carol") is True
    text = users_file.read_text()
    lines = text.splitlines()
    carol = next(line for line in lines if line.startswith("carol@example.org = "))
    assert verify_password(carol.split(" = ", 1)[1], "pw-carol")
    # Appended after the last line of [users] (the comment), before the blank line.
    expected = EXAMPLE.format(bob=stored).replace(
        "; trailing comment\n", f"; trailing comment\n{carol}\n"
    )
    assert text == expected
    assert list_users(users_file) == ["alice", "bob@example.com", "carol@example.org"]
    assert "pw-carol" not in text


def test_add_existing_user_replaces_in_place(users_file: Path, stored: str) -> None:
    assert add_user(users_file, "alice", "new-password") is False
    lines = users_file.read_text().splitlines()
    assert lines[6].startswith("alice = scrypt$")
    assert verify_password(read_users(users_file)["alice"], "new-password")
    assert lines[:6] == EXAMPLE.format(bob=stored).splitlines()[:6]
    assert lines[7:] == EXAMPLE.format(bob=stored).splitlines()[7:]
    assert "alice = not-a-user" in lines  # the other section is untouched


def test_add_drops_duplicate_entries(tmp_path: Path) -> None:
    path = tmp_path / "auth_flat_file.ini"
    path.write_text("[users]\ndave = one\neve = x\ndave = two\n")
    add_user(path, "dave", "three")
    assert list_users(path) == ["dave", "eve"]
    assert path.read_text().count("dave") == 1
    assert verify_password(read_users(path)["dave"], "three")


def test_add_creates_file_and_section(tmp_path: Path) -> None:
    path = tmp_path / "auth_flat_file.ini"
    assert add_user(path, "frank", "pw") is True
    text = path.read_text()
    assert text.startswith("[users]\nfrank = scrypt$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    other = tmp_path / "other.ini"
    other.write_text("[core]\nmethods = PLAIN")  # no trailing newline
    add_user(other, "gina", "pw")
    assert other.read_text().startswith("[core]\nmethods = PLAIN\n\n[users]\ngina = scrypt$")


def test_mode_0600_even_when_file_was_world_readable(users_file: Path) -> None:
    users_file.chmod(0o644)
    add_user(users_file, "henry", "pw")
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    users_file.chmod(0o644)
    assert delete_user(users_file, "henry")
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600


def test_crlf_files_stay_crlf(tmp_path: Path) -> None:
    path = tmp_path / "auth_flat_file.ini"
    path.write_bytes(b"[users]\r\nivy = pw\r\n")
    add_user(path, "jack", "pw")
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == 3 and raw.count(b"\n") == 3


def test_delete_user(users_file: Path, stored: str) -> None:
    assert delete_user(users_file, "alice") is True
    assert list_users(users_file) == ["bob@example.com"]
    text = users_file.read_text()
    assert text == EXAMPLE.format(bob=stored).replace("alice = password1\n", "")
    assert "alice = not-a-user" in text  # same key in another section stays
    assert delete_user(users_file, "alice") is False
    assert delete_user(users_file, "nobody") is False
    assert delete_user(users_file.parent / "missing.ini", "alice") is False
    assert not (users_file.parent / "missing.ini").exists()


def test_no_temp_files_left_behind(users_file: Path) -> None:
    add_user(users_file, "kim", "pw")
    delete_user(users_file, "kim")
    assert sorted(p.name for p in users_file.parent.iterdir()) == ["auth_flat_file.ini"]


@pytest.mark.parametrize(
    "name",
    ["", "a b", "a\tb", "a=b", "[users]", "a]", "new\nline", "nul\x00", "bell\x07", "#x", ";x"],
)
def test_invalid_names_rejected(users_file: Path, name: str) -> None:
    before = users_file.read_text()
    with pytest.raises(InvalidUserName):
        add_user(users_file, name, "pw")
    assert users_file.read_text() == before


def test_valid_names_accepted(tmp_path: Path) -> None:
    path = tmp_path / "auth_flat_file.ini"
    for name in ("user@example.com", "a.b-c_d+tag", "Ünïcode"):
        add_user(path, name, "pw")
    assert list_users(path) == ["user@example.com", "a.b-c_d+tag", "Ünïcode"]


def test_add_with_bad_password_leaves_file_alone(users_file: Path) -> None:
    before = users_file.read_text()
    with pytest.raises(InvalidPassword):
        add_user(users_file, "lee", "")
    assert users_file.read_text() == before


# --------------------------------------------------------------------------
# UserStore


def test_user_store_verify(users_file: Path) -> None:
    add_user(users_file, "mia", "mia-pw")
    store = UserStore.load(users_file)
    assert len(store) == 3 and "mia" in store
    assert store.verify("mia", "mia-pw")
    assert not store.verify("mia", "wrong")
    assert store.verify("alice", "password1")  # plaintext entry still works
    assert not store.verify("nobody", "mia-pw")
    assert not store.verify("MIA", "mia-pw")  # names are case-sensitive
    assert store.names() == ["alice", "bob@example.com", "mia"]
    assert repr(store) == "UserStore(3 users)"
    assert list(store.problems()) == ["alice"]


def test_user_store_from_mapping_and_missing_file(tmp_path: Path) -> None:
    assert len(UserStore.load(tmp_path / "none.ini")) == 0
    store = UserStore({"a": pbkdf2_value("pw", "salt", 10)})
    assert store.verify("a", "pw")


def test_unknown_user_costs_a_kdf_run(stored: str) -> None:
    store = UserStore({"real": stored})
    aff._dummy()  # the dummy hash is made once; do not count that
    start = time.perf_counter()
    store.verify("real", "wrong")
    known = time.perf_counter() - start
    start = time.perf_counter()
    store.verify("ghost", "wrong")
    unknown = time.perf_counter() - start
    assert unknown > known / 4


async def test_averify_does_not_block_the_loop(stored: str) -> None:
    store = UserStore({"real": stored})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(store.averify("real", SECRET) for _ in range(4)))
    task.cancel()
    assert results == [True] * 4
    assert ticks > 3


# --------------------------------------------------------------------------
# Throttle


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def fail(throttle: AuthThrottle, ip: str) -> ThrottleVerdict:
    """One admitted attempt that fails, as the SMTP session runs it."""
    assert await throttle.admit(ip) is Admission.CHECK
    return await throttle.failed(ip)


async def succeed(throttle: AuthThrottle, ip: str) -> None:
    assert await throttle.admit(ip) is Admission.CHECK
    await throttle.succeeded(ip)


async def test_throttle_delays_beyond_max_failures_then_disconnects_then_blocks() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(
        max_failures=3, failure_delay=2.0, disconnect_after=10, block_seconds=300, clock=clock
    )
    ip = "192.0.2.1"
    delays = []
    for n in range(1, 10):
        verdict = await fail(throttle, ip)
        assert verdict.failures == n and not verdict.disconnect
        delays.append(verdict.delay)
        assert not await throttle.is_blocked(ip)
    # The docs: each failure *beyond* auth_max_failures waits, the 4th first.
    assert delays == [0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    verdict = await fail(throttle, ip)
    assert verdict.disconnect and verdict.failures == 10
    assert await throttle.is_blocked(ip)
    assert await throttle.admit(ip) is Admission.REFUSE  # never checked while blocked
    clock.now += 299
    assert await throttle.is_blocked(ip)
    await throttle.succeeded(ip)  # a success does not lift a block
    assert await throttle.is_blocked(ip)
    clock.now += 1
    assert not await throttle.is_blocked(ip)
    assert await throttle.failures(ip) == 0
    assert (await fail(throttle, ip)).failures == 1


async def test_the_delay_starts_after_max_failures() -> None:
    """Issue item 4: max_failures=2, delay 1.5: the 2nd failure waits nothing, the 3rd 1.5 s."""
    throttle = AuthThrottle(max_failures=2, failure_delay=1.5, clock=FakeClock())
    assert [(await fail(throttle, "192.0.2.1")).delay for _ in range(4)] == [0.0, 0.0, 1.5, 3.0]
    zero = AuthThrottle(max_failures=0, failure_delay=1.5, clock=FakeClock())
    assert [(await fail(zero, "192.0.2.1")).delay for _ in range(2)] == [1.5, 3.0]


async def test_a_burst_is_admitted_only_up_to_the_allowance() -> None:
    """Failures plus checks in flight never exceed disconnect_after; the rest wait."""
    throttle = AuthThrottle(disconnect_after=5, clock=FakeClock())
    admissions = await asyncio.gather(*(throttle.admit("192.0.2.1") for _ in range(30)))
    assert admissions.count(Admission.CHECK) == 5
    assert admissions.count(Admission.WAIT) == 25
    # A failure still uses its share of the allowance: the others keep waiting.
    assert not (await throttle.failed("192.0.2.1")).disconnect
    assert await throttle.admit("192.0.2.1") is Admission.WAIT
    # The other four fail too: the fifth failure blocks; the waiting are refused.
    verdicts = [await throttle.failed("192.0.2.1") for _ in range(4)]
    assert [v.disconnect for v in verdicts] == [False, False, False, True]
    assert await throttle.admit("192.0.2.1") is Admission.REFUSE


async def test_successes_in_flight_only_make_a_burst_wait() -> None:
    """Fifty right passwords at once from one IP: all are admitted in turn, none refused."""
    throttle = AuthThrottle(disconnect_after=3, clock=FakeClock())
    done = 0
    for _ in range(50):
        while (admission := await throttle.admit("192.0.2.1")) is Admission.WAIT:
            await throttle.succeeded("192.0.2.1")
            done += 1
        assert admission is Admission.CHECK
    assert done == 47


async def test_a_check_whose_process_died_stops_counting() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(disconnect_after=1, stale_after=120, clock=clock)
    assert await throttle.admit("192.0.2.1") is Admission.CHECK  # ... and never settled
    assert await throttle.admit("192.0.2.1") is Admission.WAIT
    clock.now += 121
    assert await throttle.admit("192.0.2.1") is Admission.CHECK


async def test_throttle_delay_is_capped() -> None:
    throttle = AuthThrottle(
        max_failures=1, failure_delay=7.0, disconnect_after=100, max_delay=30, clock=FakeClock()
    )
    delays = [(await fail(throttle, "192.0.2.1")).delay for _ in range(20)]
    assert delays[-1] == 30.0 and max(delays) == 30.0


async def test_throttle_success_resets_and_ips_are_separate() -> None:
    throttle = AuthThrottle(clock=FakeClock())
    for _ in range(5):
        await fail(throttle, "192.0.2.1")
    await fail(throttle, "192.0.2.2")
    assert await throttle.failures("192.0.2.1") == 5
    assert await throttle.failures("192.0.2.2") == 1
    await succeed(throttle, "192.0.2.1")
    assert await throttle.failures("192.0.2.1") == 0
    assert await throttle.failures("192.0.2.2") == 1


async def test_throttle_forgets_old_failures() -> None:
    clock = FakeClock()
    store = MemoryThrottleStore()
    throttle = AuthThrottle(forget_after=600, clock=clock, store=store)
    for _ in range(5):
        await fail(throttle, "192.0.2.1")
    clock.now += 599
    assert await throttle.failures("192.0.2.1") == 5
    clock.now += 1
    assert await throttle.failures("192.0.2.1") == 0
    assert await store.throttle_prune(clock.now, clock.now - 600, 100) == 1
    assert store.entries == {}


async def test_throttle_store_is_bounded() -> None:
    store = MemoryThrottleStore()
    clock = FakeClock()
    throttle = AuthThrottle(max_entries=100, clock=clock, store=store)
    for i in range(1000):
        clock.now += 0.001
        await fail(throttle, f"198.18.{i // 256}.{i % 256}")
    assert await store.throttle_prune(clock.now, clock.now - 3600, 100) == 900
    assert len(store.entries) == 100
    assert await throttle.failures("198.18.0.0") == 0  # oldest dropped
    assert await throttle.failures("198.18.3.231") == 1  # newest kept


async def test_throttle_groups_ipv6_by_prefix_and_unmaps_ipv4() -> None:
    throttle = AuthThrottle(clock=FakeClock())
    await fail(throttle, "2001:db8:1:2::1")
    await fail(throttle, "2001:db8:1:2:ffff::9")
    await fail(throttle, "2001:db8:1:3::1")
    assert await throttle.failures("2001:db8:1:2::abcd") == 2
    assert await throttle.failures("2001:db8:1:3::") == 1
    await fail(throttle, "::ffff:192.0.2.9")
    assert await throttle.failures("192.0.2.9") == 1
    assert throttle.key_for("fe80::1%eth0") == "fe80::/64"
    assert throttle.key_for("unix-socket") == "unix-socket"


async def test_throttle_block_seconds_zero_still_disconnects() -> None:
    throttle = AuthThrottle(disconnect_after=2, block_seconds=0, clock=FakeClock())
    assert not (await fail(throttle, "192.0.2.1")).disconnect
    assert (await fail(throttle, "192.0.2.1")).disconnect
    assert (await fail(throttle, "192.0.2.1")).failures == 1  # a zero block ends at once


@pytest.mark.parametrize(
    ("settings", "ok"),
    [
        ({"max_failures": 0}, True),
        ({"max_failures": 1_000_000}, True),
        ({"max_failures": -1}, False),
        ({"max_failures": 1_000_001}, False),
        ({"disconnect_after": 1}, True),
        ({"disconnect_after": 0}, False),
        ({"disconnect_after": 1_000_001}, False),
        ({"failure_delay": 0}, True),
        ({"failure_delay": -1}, False),
        ({"failure_delay": float("nan")}, False),
        ({"block_seconds": 0}, True),
        ({"block_seconds": -0.5}, False),
        ({"block_seconds": float("inf")}, False),
    ],
)
def test_throttle_accepts_exactly_the_documented_ranges(
    settings: dict[str, float], ok: bool
) -> None:
    if ok:
        AuthThrottle(**settings)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError):
            AuthThrottle(**settings)  # type: ignore[arg-type]


def test_store_follows_the_file(tmp_path: Path) -> None:
    """A user added with outboundctl while the daemon runs can log in at once."""
    path = tmp_path / "auth_flat_file.ini"
    add_user(path, "alice", "first")
    store = UserStore.load(path)
    assert store.verify("alice", "first") and not store.verify("bob", "second")
    add_user(path, "bob", "second")
    assert store.verify("bob", "second")
    delete_user(path, "alice")
    assert not store.verify("alice", "first")
    path.write_bytes(b"[users]\nbob = \xff\xfe not UTF-8\n")
    assert store.verify("bob", "second")  # an unreadable edit keeps the previous users
    assert store.reload_error is not None
