"""Every numeric key: accepted at its bounds, refused past them, never a traceback.

The ranges come from the loader itself (``numeric_settings()``), so a key
added later is driven here without editing this file.  Three layers:

* the documentation's "Accepted ranges" table lists exactly those ranges;
* the real loader takes each key at its lower and upper bound and refuses
  it one step past either, with one line naming the file and the key;
* the real ``outboundd``: started with every key at its lower bound, and
  with every key at its upper bound, it runs, takes a message and gets it
  to a result through a loopback DNS server and MX; with a key past its
  bound, its entry point (every key, both sides) and the command itself (a
  key of each file) exit 1 with that one line on stderr.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from outboundd.config import ConfigError, load_config
from outboundd.config.loader import numeric_settings
from outboundd.config.ranges import NumericSetting
from outboundd.daemon import main
from tests.dnsserver import DNSServer
from tests.harness import Daemon, free_port, submit
from tests.mxserver import MXScript, MXServer, mx_server

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = numeric_settings()
#: The smallest value tried for a duration that must be more than 0.
TINY = "0.001"


def text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def at_bounds(setting: NumericSetting) -> tuple[str, str]:
    """The lowest and the highest value the key accepts, as written in a file."""
    low = TINY if setting.minimum == 0 and not setting.zero_ok else text(setting.minimum)
    return low, text(setting.maximum)


def past_bounds(setting: NumericSetting) -> tuple[str, str]:
    """One step below and one step above what the key accepts."""
    step = 1 if setting.kind == "integer" else 0.5
    if setting.kind == "seconds" and setting.minimum == 0:
        below = "-1" if setting.zero_ok else "0"
    else:
        below = text(setting.minimum - step)
    return below, text(setting.maximum + step)


def ids(setting: NumericSetting) -> str:
    return f"{setting.file}:{setting.key}"


def write(config: Path, values: dict[NumericSetting, str], extra: dict[str, list[str]]) -> Path:
    """A config dir with ``values`` in their files, plus ``extra`` lines per file."""
    config.mkdir(parents=True, exist_ok=True)
    (config / "me").write_text("outboundd.test\n")
    files: dict[str, list[str]] = {name: list(lines) for name, lines in extra.items()}
    files.setdefault("log.ini", []).append("format=logfmt")
    for setting, value in values.items():
        files.setdefault(setting.file, []).append(f"{setting.key}={value}")
    for name, lines in files.items():
        (config / name).write_text("[main]\n" + "\n".join(lines) + "\n")
    (config / "relay_acl_allow").write_text("127.0.0.0/8\n")
    return config


def test_the_ranges_cover_every_file_with_numbers() -> None:
    files = {s.file for s in SETTINGS}
    assert files == {"smtp.ini", "outbound.ini", "log.ini"}
    assert len(SETTINGS) >= 25
    for setting in SETTINGS:
        assert setting.minimum <= setting.maximum, setting


def test_the_documentation_lists_exactly_the_loaders_ranges() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    section = doc.split("## Accepted ranges", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| ([^|]+?) \|$", section, re.M))
    assert rows == {(s.file, s.key, s.range_text) for s in SETTINGS}


# --------------------------------------------------------------------------
# The real loader


def cases() -> Iterator[tuple[NumericSetting, str, bool]]:
    for setting in SETTINGS:
        for value in at_bounds(setting):
            yield setting, value, True
        for value in past_bounds(setting):
            yield setting, value, False


@pytest.mark.parametrize(
    ("setting", "value", "accepted"),
    list(cases()),
    ids=[f"{ids(s)}={v}" for s, v, _ in cases()],
)
def test_the_loader_takes_the_bounds_and_refuses_past_them(
    tmp_path: Path, setting: NumericSetting, value: str, accepted: bool
) -> None:
    config = write(tmp_path / "config", {setting: value}, {})
    if accepted:
        loaded = load_config(config)
        section = {"smtp.ini": loaded.smtp, "outbound.ini": loaded.outbound,
                   "log.ini": loaded.log}[setting.file]  # fmt: skip
        attribute = "max_temp_failures" if setting.key == "maxTempFailures" else setting.key
        assert float(getattr(section, attribute)) == float(value)
        return
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{setting.file} [main] {setting.key}: {value!r}" in message


# --------------------------------------------------------------------------
# The real daemon


@pytest.fixture
async def mx(dns_server: DNSServer) -> AsyncIterator[tuple[DNSServer, MXServer]]:
    dns_server.zones.update(
        {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}
    )
    async with mx_server(MXScript(), host="127.0.0.2") as server:
        yield dns_server, server


#: Process counts run at a few, not at their bound of 64 processes each (a
#: test machine's memory); the loader test and the past-bound run cover 64.
PROCESS_KEYS = {"nodes", "delivery_processes"}
#: The daemon runs keep log.ini at INFO: the harness waits for the INFO and
#: NOTICE lines (level 0 would hide them); the loader test covers 0 to 9.
LOG_FILE = "log.ini"


@pytest.mark.parametrize("bound", ["lower", "upper"])
async def test_the_daemon_runs_with_every_key_at_a_bound(
    tmp_path: Path, mx: tuple[DNSServer, MXServer], bound: str
) -> None:
    dns, server = mx
    values: dict[NumericSetting, str] = {}
    for setting in SETTINGS:
        if setting.file == LOG_FILE:
            continue
        low, high = at_bounds(setting)
        values[setting] = low if bound == "lower" else high
        if setting.key in PROCESS_KEYS and bound == "upper":
            values[setting] = "2"
        if setting.key == "mx_port":
            values[setting] = str(server.port)  # the MX must be reachable
    port = free_port()
    extra = {
        "smtp.ini": [f"listen=127.0.0.1:{port}"],
        "outbound.ini": [f"nameservers=127.0.0.1:{dns.port}", "local_mx_ok=true"],
        "log.ini": ["level=info"],
    }
    config = write(tmp_path / "config", values, extra)
    d = Daemon(config)
    await d.start()
    try:
        if bound == "lower":
            # inactivity_timeout at its lower bound closes every session at
            # once; a running, answering daemon is what "starts" means here.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            banner = await asyncio.wait_for(reader.readline(), 10)
            assert banner[:3] in (b"220", b"421"), banner
            writer.close()
        else:
            qid = await submit(port, "alice@sender.test", ["bob@dest.test"])
            await d.wait_for_status(qid, "delivered", timeout=20)
        await asyncio.sleep(1.0)  # a scheduler that dies on a bound does so by now
    finally:
        status = await d.stop()
    assert status == 0
    assert not [line for line in d.lines if "Traceback" in line or "level=CRIT" in line]


async def run_outboundd(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outboundd", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"outboundd -c {config} did not exit on a bad value") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.fixture
def own_signals() -> Iterator[None]:
    """``main()`` installs its early signal handlers; give the test run its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def check_refusal(setting: NumericSetting, value: str, status: int, err: str) -> None:
    assert status == 1, (setting, value, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("outboundd: "), lines
    assert f"{setting.file} [main] {setting.key}: {value!r}" in lines[0], lines


@pytest.mark.usefixtures("own_signals")
def test_outboundd_main_refuses_every_key_past_either_bound_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``outboundd``'s own entry point, in this process (a Python start per
    case would cost a minute), for both sides of every key."""
    for number, setting in enumerate(SETTINGS):
        for side, value in enumerate(past_bounds(setting)):
            config = write(tmp_path / f"c{number}-{side}" / "config", {setting: value}, {})
            status = main(["-c", str(config)])
            check_refusal(setting, value, status, capsys.readouterr().err)


async def test_the_outboundd_command_refuses_a_key_past_a_bound_in_one_line(
    tmp_path: Path,
) -> None:
    """The command itself, as an operator runs it: a key of each file, each side."""
    chosen = [
        next(s for s in SETTINGS if s.file == "smtp.ini" and s.key == "max_line_length"),
        next(s for s in SETTINGS if s.file == "outbound.ini" and s.key == "concurrency_max"),
    ]

    async def one(number: int, setting: NumericSetting, value: str) -> None:
        config = write(tmp_path / f"c{number}" / "config", {setting: value}, {})
        status, err = await run_outboundd(config)
        check_refusal(setting, value, status, err)

    await asyncio.gather(
        *(
            one(2 * n + side, setting, value)
            for n, setting in enumerate(chosen)
            for side, value in enumerate(past_bounds(setting))
        )
    )
