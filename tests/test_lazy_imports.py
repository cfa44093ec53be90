"""The heavy optional libraries stay out of a process that does not use them.

httpx (MTA-STS fetches), dkimpy with PyNaCl (DKIM signing) and cryptography
(DKIM keys, DANE certificate checks) cost each process tens of megabytes;
they are imported on first use.  Each check runs in a fresh interpreter,
since this test process has long since imported all of them.  In the running
daemon the C extensions of cryptography and PyNaCl show in each process's
``/proc/PID/maps`` when loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from outboundd.dkimkeys import generate_key
from tests.harness import free_port, running, write_config

HEAVY = ("httpx", "dkim", "nacl", "cryptography")

_PROBE = """
import json, sys
from pathlib import Path
import outboundd.daemon
from outboundd import log
from outboundd.config import load_config
from outboundd.submission.dkim import signer_for

heavy = {heavy!r}
def loaded():
    return sorted(m for m in heavy if m in sys.modules)

result = {{"import": loaded()}}
config = load_config(Path(sys.argv[1]))
result["config"] = loaded()
signer = signer_for(config, log.get_logger("test"))
if signer is not None:
    msg = b"From: a@mail.example\\r\\nTo: b@x.example\\r\\nSubject: hi\\r\\n\\r\\nbody\\r\\n"
    result["signed"] = signer.sign(msg).startswith(b"DKIM-Signature:")
    result["after_sign"] = loaded()
print(json.dumps(result))
"""


def _probe(config_dir: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), str(config_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def _config_dir(tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.mkdir()
    (path / "me").write_text("relay.mail.example\n")
    return path


def test_import_and_config_with_dkim_off_load_none_of_them(tmp_path: Path) -> None:
    config_dir = _config_dir(tmp_path)
    # A key on disk is not read while signing is off, so nothing is imported for it.
    generate_key(config_dir / "dkim", "mail.example", "s1", "rsa")
    (config_dir / "dkim.ini").write_text("[sign]\nenabled = false\n")
    result = _probe(config_dir)
    assert result == {"import": [], "config": []}


def test_dkim_on_loads_keys_and_signs_in_a_fresh_process(tmp_path: Path) -> None:
    config_dir = _config_dir(tmp_path)
    generate_key(config_dir / "dkim", "mail.example", "s1", "rsa")
    generate_key(config_dir / "dkim", "mail.example", "s2", "ed25519")
    (config_dir / "dkim.ini").write_text("[sign]\nenabled = true\n")
    result = _probe(config_dir)
    assert result["import"] == []
    assert result["config"] == ["cryptography"]  # the keys are parsed at start-up
    assert result["signed"] is True
    assert result["after_sign"] == ["cryptography", "dkim", "nacl"]


def _mapped_libraries(pid: int) -> set[str]:
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.rstrip().endswith(".so")}


async def test_running_daemon_processes_map_no_crypto_library(tmp_path: Path) -> None:
    """Every process of a started daemon (DKIM off, no MTA-STS/DANE yet)."""
    config_dir = write_config(
        tmp_path / "config",
        dns_port=free_port(),
        mx_port=free_port(),
        smtp={"nodes": 2},
    )
    async with running(config_dir) as daemon:
        assert daemon.proc is not None
        pids = [daemon.proc.pid, *daemon.children()]
        assert len(pids) == 3  # outboundd (the first SMTP node), a second one, a deliverer
        libraries = set().union(*(_mapped_libraries(pid) for pid in pids))
    assert any("/_ssl." in lib for lib in libraries)  # the check sees extension modules
    assert not [lib for lib in libraries if "/cryptography/" in lib or "/nacl/" in lib]
