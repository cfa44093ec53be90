"""The three relays under test, each started fresh on loopback ports.

Every relay gets its own working directory (config + queue) per run, listens
on 127.0.0.1 only, routes every domain to the sink, and is stopped by PID.
Nothing under /etc is written: Postfix runs as a separate instance from a
generated ``main.cf``/``master.cf`` (``postfix -c DIR``); Haraka runs from
an instance directory made by ``haraka -i``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.pgserver import DbCalls, PgServer, QueueReader
from benchlib.procs import BenchError, ProcessRegistry, Started, log, run_helper
from benchlib.traffic import free_port, wait_for_banner

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "outboundd-bench"
HARAKA_VERSION = "3.1.7"
HARAKA_DIR = CACHE / f"haraka-{HARAKA_VERSION}"
POSTFIX = "/usr/sbin/postfix"
START_TIMEOUT = 60.0


@dataclass
class RelaySettings:
    """Knobs shared by all relays (kept equal where the relay has the knob)."""

    concurrency_max: int = 100
    domain_concurrency_max: int = 20
    #: Haraka's smtp.ini ``nodes`` (worker processes); "cpus" is its performance advice.
    haraka_nodes: str = "cpus"
    #: outboundd's smtp.ini ``nodes`` and outbound.ini ``delivery_processes``.
    outboundd_nodes: str = "cpus"
    outboundd_delivery_processes: int = 0
    #: ``--backend postgresql``: outboundd's queue in this server (a database per run).
    pg_server: PgServer | None = None
    #: ``--dkim``: the key types outboundd signs with ("rsa", "ed25519" or both);
    #: Haraka signs with its dkim plugin and an RSA key.  None: nobody signs.
    dkim_types: tuple[str, ...] | None = None


#: The From domain of the bench traffic (smtp-source -f), whose key signs.
DKIM_DOMAIN = "source.bench.test"


def outboundctl_executable() -> Path:
    """``outboundctl`` beside the ``outboundd`` the bench runs."""
    return outboundd_executable().parent / "outboundctl"


def make_dkim_key(config_dir: Path, key_type: str, selector: str) -> None:
    """``outboundctl dkim keygen``: the key files in Haraka's layout under ``config_dir``."""
    res = run_helper(
        [str(outboundctl_executable()), "-c", str(config_dir), "dkim", "keygen", DKIM_DOMAIN,
         "--type", key_type, "--selector", selector],
        timeout=60,
    )  # fmt: skip
    if res.returncode != 0:
        raise BenchError(f"outboundctl dkim keygen failed: {res.output.strip()[-400:]}")


class Relay:
    """One relay instance: start (optionally with delivery held), release, count, stop."""

    name = "relay"
    label = "relay"

    def __init__(
        self, registry: ProcessRegistry, workdir: Path, sink_port: int, settings: RelaySettings
    ) -> None:
        self.registry = registry
        self.workdir = workdir
        self.sink_port = sink_port
        self.settings = settings
        self.port = free_port()
        self.started: Started | None = None

    @property
    def root_pid(self) -> int:
        assert self.started is not None
        return self.started.pid

    def start(self, hold: bool, timeout: float = START_TIMEOUT) -> None:
        raise NotImplementedError

    def release(self) -> float:
        """Let held mail go; returns CPU seconds spent by helper commands."""
        raise NotImplementedError

    def pending(self) -> int:
        """Messages (or recipients) the relay still has to deliver."""
        raise NotImplementedError

    def cpu_roots(self) -> list[int]:
        """The process trees whose CPU is the relay's (its own, and its database's)."""
        return [self.root_pid]

    def db_calls(self) -> DbCalls | None:
        """Statements run against the relay's queue database so far, when it has one."""
        return None

    def stop(self) -> None:
        if self.started is not None:
            self.registry.stop(self.started, grace=20)
            self.started = None

    def logfile(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile().read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- outboundd


def outboundd_executable() -> Path:
    """The ``outboundd`` of the Python running the bench, else the repository's .venv."""
    for candidate in (Path(sys.executable).parent / "outboundd", REPO / ".venv/bin/outboundd"):
        if candidate.exists():
            return candidate
    found = shutil.which("outboundd")
    if found is None:
        raise BenchError("outboundd is not installed: run `make install` first")
    return Path(found)


class OutbounddRelay(Relay):
    """``.venv/bin/outboundd -c DIR`` with a ``get_mx`` plugin routing to the sink."""

    name = "outboundd"
    label = "outboundd"
    #: False for the unsigned baseline that ``--dkim`` runs beside the signing relay.
    may_sign = True

    @property
    def dkim_types(self) -> tuple[str, ...]:
        return (self.settings.dkim_types or ()) if self.may_sign else ()

    @property
    def config_dir(self) -> Path:
        return self.workdir / "config"

    database: str | None = None
    reader: QueueReader | None = None

    @property
    def db_path(self) -> Path:
        return self.workdir / "queue" / "outbound.db"

    def _outbound_ini(self, disabled: bool) -> str:
        server = self.settings.pg_server
        queue_url = server.url(self.database) if server and self.database else None
        return textwrap.dedent(f"""\
            [main]
            queue_dir = {self.workdir / "queue"}
            {f"queue_url = {queue_url}" if queue_url else ""}
            disabled = {"true" if disabled else "false"}
            concurrency_max = {self.settings.concurrency_max}
            domain_concurrency_max = {self.settings.domain_concurrency_max}
            local_mx_ok = true
            delivery_processes = {self.settings.outboundd_delivery_processes}
            """)

    def write_config(self, hold: bool) -> None:
        cfg = self.config_dir
        (self.workdir / "plugins").mkdir(parents=True, exist_ok=True)
        cfg.mkdir(parents=True, exist_ok=True)
        (cfg / "me").write_text("relay.bench.test\n")
        (cfg / "smtp.ini").write_text(
            f"[main]\nlisten = 127.0.0.1:{self.port}\nnodes = {self.settings.outboundd_nodes}\n"
        )
        (cfg / "outbound.ini").write_text(self._outbound_ini(hold))
        (cfg / "relay_acl_allow").write_text("127.0.0.0/8\n")
        (cfg / "plugins").write_text("bench_route\n")
        if self.dkim_types:
            (cfg / "dkim.ini").write_text("[sign]\nenabled = true\n")
            for key_type in self.dkim_types:
                make_dkim_key(cfg, key_type, f"bench{key_type}")
        (self.workdir / "plugins" / "bench_route.py").write_text(
            textwrap.dedent(f'''\
                """Benchmark routing: every domain goes to the local smtp-sink."""

                from outboundd.hooks import ok


                async def get_mx(hmail, domain):
                    return ok("127.0.0.1:{self.sink_port}")
                ''')
        )

    def start(self, hold: bool, timeout: float = START_TIMEOUT) -> None:
        server = self.settings.pg_server
        if server is not None:
            self.database = server.database()
            self.reader = QueueReader(server, self.database)
        self.write_config(hold)
        exe = outboundd_executable()
        self.started = self.registry.spawn(
            "outboundd", [str(exe), "-c", str(self.config_dir)], stdout=self.logfile()
        )
        try:
            wait_for_banner(self.port, timeout, self.started)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc

    def release(self) -> float:
        # Hot reload: the daemon re-reads outbound.ini within about a second.
        path = self.config_dir / "outbound.ini"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self._outbound_ini(False))
        tmp.replace(path)
        return 0.0

    def cpu_roots(self) -> list[int]:
        server = self.settings.pg_server
        return [self.root_pid] + ([server.root_pid] if server is not None else [])

    def db_calls(self) -> DbCalls | None:
        server = self.settings.pg_server
        return server.calls(self.database) if server and self.database else None

    def stop(self) -> None:
        super().stop()
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def status_counts(self) -> dict[str, int]:
        """Recipients per status, from the spool's accounting view."""
        if self.reader is not None:
            return self.reader.status_counts()
        if not self.db_path.exists():
            return {}
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status")
            return {str(status): int(n) for status, n in rows}
        finally:
            conn.close()

    def pending(self) -> int:
        counts = self.status_counts()
        return sum(n for s, n in counts.items() if s not in ("delivered", "bounced", "dropped"))


class OutbounddUnsignedRelay(OutbounddRelay):
    """outboundd without DKIM: the baseline for what signing costs (``--dkim``)."""

    name = "outboundd-unsigned"
    label = "outboundd (unsigned)"
    may_sign = False


# --------------------------------------------------------------------------- Postfix

POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixRelay(Relay):
    """A private Postfix instance (``postfix -c DIR start-fg``) relaying to the sink."""

    name = "postfix"
    label = "Postfix"

    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "spool"

    def write_config(self, hold: bool) -> None:
        cfg = self.config_dir
        cfg.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        os.chmod(self.workdir, 0o755)
        restrictions = "check_client_access static:HOLD" if hold else ""
        main_cf = textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.queue_dir}
            data_directory = {self.workdir / "data"}
            myhostname = relay.bench.test
            mydomain = bench.test
            myorigin = $myhostname
            mydestination =
            relay_domains =
            local_recipient_maps =
            inet_interfaces = loopback-only
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            relayhost = [127.0.0.1]:{self.sink_port}
            smtpd_client_restrictions = {restrictions}
            smtp_tls_security_level = none
            smtpd_tls_security_level = none
            maillog_file = {self.logfile()}
            maillog_file_prefixes = {self.workdir}
            biff = no
            alias_maps =
            alias_database =
            """)
        (cfg / "main.cf").write_text(main_cf)
        (cfg / "master.cf").write_text(self._master_cf())

    def _master_cf(self) -> str:
        """The packaged master.cf, with our listener and no chroot (no jail to populate)."""
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # chroot
                line = " ".join(fields)
            lines.append(line)
        return "\n".join(lines) + "\n"

    def _postfix(self, *args: str, timeout: float = 60) -> str:
        res = run_helper([POSTFIX, "-c", str(self.config_dir), *args], timeout=timeout)
        if res.returncode != 0:
            raise BenchError(f"postfix {' '.join(args)} failed: {res.output.strip()[-400:]}")
        return res.output

    def start(self, hold: bool, timeout: float = START_TIMEOUT) -> None:
        self.write_config(hold)
        self._postfix("check")
        self.started = self.registry.spawn(
            "postfix",
            [POSTFIX, "-c", str(self.config_dir), "start-fg"],
            stdout=self.workdir / "postfix-start.log",
        )
        try:
            wait_for_banner(self.port, timeout, self.started)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc

    def release(self) -> float:
        cfg = str(self.config_dir)
        cpu = 0.0
        for argv in (
            ["/usr/sbin/postconf", "-c", cfg, "-e", "smtpd_client_restrictions="],
            ["/usr/sbin/postsuper", "-c", cfg, "-H", "ALL"],
            ["/usr/sbin/postqueue", "-c", cfg, "-f"],
        ):
            res = run_helper(argv, timeout=300)
            cpu += res.cpu_seconds
            if res.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed: {res.output.strip()[-400:]}")
        return cpu

    def pending(self) -> int:
        total = 0
        for queue in POSTFIX_QUEUES:
            for _dirpath, _dirs, files in os.walk(self.queue_dir / queue):
                total += len(files)
        return total

    def stop(self) -> None:
        if self.started is not None and self.started.proc.poll() is None:
            try:
                run_helper([POSTFIX, "-c", str(self.config_dir), "stop"], timeout=30)
            except BenchError as exc:
                log(f"postfix stop: {exc}")
            deadline = time.monotonic() + 15
            while self.started.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        super().stop()


# --------------------------------------------------------------------------- Haraka

HARAKA_PLUGIN = """\
// Benchmark plugin: every client relays, every domain goes to the local smtp-sink.
exports.hook_connect_init = function (next, connection) {
    connection.relaying = true
    next()
}

exports.hook_get_mx = function (next, hmail, domain) {
    next(OK, { exchange: '127.0.0.1', port: %(sink_port)d })
}
"""


def haraka_bin() -> Path:
    return HARAKA_DIR / "node_modules" / ".bin" / "haraka"


def install_haraka() -> None:
    """``npm install Haraka@3.1.7`` into the bench cache (outside the repository)."""
    if haraka_bin().exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("npm is not installed (apt-get install -y npm), so Haraka cannot run")
    HARAKA_DIR.mkdir(parents=True, exist_ok=True)
    (HARAKA_DIR / "package.json").write_text('{"name": "bench-haraka", "private": true}\n')
    log(f"installing Haraka {HARAKA_VERSION} with npm into {HARAKA_DIR}")
    res = run_helper(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(HARAKA_DIR),
         f"Haraka@{HARAKA_VERSION}"],
        timeout=600,
    )  # fmt: skip
    if res.returncode != 0 or not haraka_bin().exists():
        raise BenchError(f"npm install Haraka@{HARAKA_VERSION} failed: {res.output[-600:]}")


class HarakaRelay(Relay):
    """Haraka 3.1.7 from npm, an instance made by ``haraka -i``, outbound to the sink."""

    name = "haraka"
    label = f"Haraka {HARAKA_VERSION}"

    @property
    def instance(self) -> Path:
        return self.workdir / "instance"

    def _outbound_ini(self, disabled: bool) -> str:
        return textwrap.dedent(f"""\
            disabled={"true" if disabled else "false"}
            concurrency_max={self.settings.concurrency_max}
            local_mx_ok=true
            """)

    def write_config(self, hold: bool) -> None:
        if not self.instance.exists():
            res = run_helper([str(haraka_bin()), "-i", str(self.instance)], timeout=60)
            if res.returncode != 0:
                raise BenchError(f"haraka -i failed: {res.output[-400:]}")
        cfg = self.instance / "config"
        (cfg / "smtp.ini").write_text(
            f"listen=127.0.0.1:{self.port}\nnodes={self.settings.haraka_nodes}\n"
        )
        # --dkim: Haraka's own dkim plugin (shipped with Haraka 3) signs with an RSA key.
        signs = self.settings.dkim_types is not None
        (cfg / "plugins").write_text(("dkim\n" if signs else "") + "bench_relay\n")
        if signs and not (cfg / "dkim" / DKIM_DOMAIN / "private").exists():
            (cfg / "dkim.ini").write_text(
                "[sign]\nenabled = true\nheaders = From, Sender, Reply-To, Subject, Date, "
                "Message-ID, To, Cc, MIME-Version, Content-Type, Content-Transfer-Encoding\n"
            )
            make_dkim_key(cfg, "rsa", "benchrsa")
        (cfg / "me").write_text("relay.bench.test\n")
        (cfg / "outbound.ini").write_text(self._outbound_ini(hold))
        (self.instance / "plugins").mkdir(exist_ok=True)
        (self.instance / "plugins" / "bench_relay.js").write_text(
            HARAKA_PLUGIN % {"sink_port": self.sink_port}
        )

    def start(self, hold: bool, timeout: float = START_TIMEOUT) -> None:
        install_haraka()
        self.write_config(hold)
        self.started = self.registry.spawn(
            "haraka", [str(haraka_bin()), "-c", str(self.instance)], stdout=self.logfile()
        )
        try:
            wait_for_banner(self.port, timeout, self.started)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc

    def release(self) -> float:
        # Haraka watches outbound.ini and re-reads it; held mail retries every second.
        path = self.instance / "config" / "outbound.ini"
        path.write_text(self._outbound_ini(False))
        return 0.0

    def pending(self) -> int:
        queue = self.instance / "queue"
        try:
            return sum(1 for e in os.scandir(queue) if e.is_file() and not e.name.startswith("."))
        except FileNotFoundError:
            return 0


RELAYS: dict[str, type[Relay]] = {
    "outboundd": OutbounddRelay,
    "outboundd-unsigned": OutbounddUnsignedRelay,
    "postfix": PostfixRelay,
    "haraka": HarakaRelay,
}


def postfix_version() -> str:
    try:
        out = subprocess.run(
            ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip()
    except OSError:
        return "?"
