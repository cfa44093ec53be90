"""``outboundctl``: inspect and steer the queue, manage AUTH users.

Works on the same spool as a running ``outboundd`` (SQLite WAL allows it) and
calls the same spool functions the daemon uses, never its own SQL.
Exit status: 0 success, 1 the operation failed or the queue ID is unknown
(one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from outboundd import dkimctl
from outboundd import spool as spool_backend
from outboundd.config import Config, ConfigError, load_config
from outboundd.plugins import auth_flat_file
from outboundd.spool import Spool, SpoolError, Status, UnknownMessageError, admin, transfer

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: ``list`` output never needs more columns than this.
TABLE_WIDTH = 100
STATUSES = [s.value for s in Status]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class CtlError(Exception):
    """An operation failed; the message is printed as one line."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` → seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 2h or 3d")
    return float(match[1]) * _UNITS[match[2]]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


# ------------------------------------------------------------------ output


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class Styler:
    """ANSI colours only when writing to a terminal."""

    COLOURS = {
        "delivered": "32",
        "deferred": "33",
        "bounced": "31",
        "dropped": "35",
        "sending": "36",
        "queued": "0",
    }

    def __init__(self, stream: TextIO) -> None:
        # https://no-color.org: an empty NO_COLOR does not count.
        self.enabled = stream.isatty() and not os.environ.get("NO_COLOR")

    def status(self, text: str, padded: str) -> str:
        code = self.COLOURS.get(text)
        if not self.enabled or code is None:
            return padded
        return f"\x1b[{code}m{padded}\x1b[0m"


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    flexible: Mapping[int, float],
    styler: Styler | None = None,
    status_column: int | None = None,
) -> str:
    """An aligned table that fits ``width`` by shrinking the ``flexible`` columns.

    ``flexible`` maps a column to its weight: the column whose surplus over
    its minimum (its header, at least 8), times its weight, is largest loses
    a character first, so the space is shared rather than one column being
    cut to nothing.  A lower weight keeps a column whole for longer.
    """
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    minimum = {i: max(len(headers[i]), 8) for i in flexible}
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    while excess > 0:
        candidates = [i for i in flexible if widths[i] > minimum[i]]
        if not candidates:
            break  # narrower than the fixed columns: let the terminal wrap
        widest = max(candidates, key=lambda i: (widths[i] - minimum[i]) * flexible[i])
        widths[widest] -= 1
        excess -= 1
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            padded = clip(cell, widths[i]).ljust(widths[i])
            if styler is not None and i == status_column:
                padded = styler.status(cell, padded)
            cells.append(padded)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def table_width(out: TextIO) -> int:
    """The terminal's width on a TTY, else 100: piped output stays the same
    whatever terminal the command happened to run in."""
    if not out.isatty():
        return TABLE_WIDTH
    return shutil.get_terminal_size((TABLE_WIDTH, 24)).columns


def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_json(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def entry_json(entry: admin.QueueEntry) -> dict[str, Any]:
    data = dataclasses.asdict(entry)
    for key in ("next_attempt_at", "received_at", "finished_at"):
        data[key] = iso(data[key])
    return data


# ---------------------------------------------------------------- commands


async def cmd_list(spool: Spool, args: argparse.Namespace, out: TextIO) -> int:
    entries = await admin.list_queue(
        spool,
        status=args.status,
        domain=args.domain,
        sender=args.sender,
        older_than=args.older_than,
        limit=args.limit,
    )
    if args.json:
        json.dump([entry_json(e) for e in entries], out, indent=None)
        out.write("\n")
        return EXIT_OK
    if not entries:
        filtered = any(
            v is not None for v in (args.status, args.domain, args.sender, args.older_than)
        )
        out.write("no matching recipients\n" if filtered else "queue is empty\n")
        return EXIT_OK
    now = time.time()
    rows = [
        [
            e.queue_id,
            age(now - e.received_at),
            human_size(e.size),
            e.mail_from or "<>",
            e.recipient,
            e.status,
            str(e.attempts),
            ("now" if e.next_attempt_at <= now else age(e.next_attempt_at - now))
            if e.next_attempt_at is not None and e.status in ("queued", "deferred")
            else "-",
            " ".join(x for x in (str(e.last_code or ""), e.last_response or "") if x) or "-",
        ]
        for e in entries
    ]
    headers = [
        "QUEUE ID",
        "AGE",
        "SIZE",
        "SENDER",
        "RECIPIENT",
        "STATUS",
        "TRY",
        "NEXT",
        "LAST REPLY",
    ]
    # Queue IDs are never clipped (they are what the operator copies into the
    # next command); the last reply, sender and recipient give way instead.
    out.write(
        render_table(
            headers,
            rows,
            width=table_width(out),
            flexible={8: 1.0, 3: 1.0, 4: 0.6},
            styler=Styler(out),
            status_column=5,
        )
        + "\n"
    )
    more = " (--limit reached)" if args.limit is not None and len(entries) >= args.limit else ""
    out.write(f"-- {len(entries)} recipient(s){more}\n")
    return EXIT_OK


async def cmd_show(spool: Spool, args: argparse.Namespace, out: TextIO) -> int:
    detail = await admin.show_message(spool, args.id)
    headers = await _header_summary(spool, detail.queue_id)
    if args.json:
        data = to_json(detail)
        for key in ("received_at", "finished_at"):
            data[key] = iso(data[key])
        for r in data["recipients"]:
            for key in ("next_attempt_at", "last_attempt_at", "lease_expires_at", "finished_at"):
                r[key] = iso(r[key])
            for a in r["history"]:
                a["started_at"], a["finished_at"] = iso(a["started_at"]), iso(a["finished_at"])
        data["headers"] = headers
        json.dump(data, out)
        out.write("\n")
        return EXIT_OK
    w = out.write
    w(f"Queue ID:    {detail.queue_id}\n")
    w(f"From:        <{detail.mail_from}>\n")
    w(
        f"Received:    {iso(detail.received_at)}"
        f"{' from ' + detail.client_ip if detail.client_ip else ''}"
        f"{' (auth ' + detail.auth_user + ')' if detail.auth_user else ''}\n"
    )
    w(f"Size:        {detail.size} bytes\n")
    if detail.env_id or detail.ret:
        w(f"DSN:         ENVID={detail.env_id or '-'} RET={detail.ret or '-'}\n")
    if detail.dsn_of:
        w(f"DSN for:     {detail.dsn_of}\n")
    if detail.finished_at:
        w(f"Finished:    {iso(detail.finished_at)}\n")
    for name, value in headers.items():
        w(f"{name + ':':<13}{value}\n")
    for r in detail.recipients:
        w(f"\n<{r.recipient}>  {r.status}, {r.attempts} attempt(s)")
        if r.status in ("queued", "deferred") and r.next_attempt_at is not None:
            w(f", next {iso(r.next_attempt_at)}")
        w("\n")
        if r.final_reason:
            w(f"    reason: {r.final_reason}\n")
        if r.dsn_queue_id:
            w(f"    DSN: {r.dsn_queue_id}\n")
        for a in r.history:
            reply = " ".join(str(x) for x in (a.code, a.status, a.response) if x)
            where = f"{a.mx_host or '-'}[{a.mx_ip or '-'}]:{a.port or '-'}"
            tls = f" {a.tls}" if a.tls else ""
            w(f"    #{a.attempt} {iso(a.finished_at)} {a.outcome:<9} {where}{tls} {reply}\n")
    return EXIT_OK


async def _header_summary(spool: Spool, queue_id: str) -> dict[str, str]:
    """Subject, Message-ID, From, To, Date of a queued body (empty when gone)."""
    try:
        head = (await spool.read_body(queue_id))[: 64 * 1024]
    except SpoolError:
        return {}
    block = head.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n[ \t]+", " ", block)
    wanted = {
        "subject": "Subject",
        "message-id": "Message-ID",
        "from": "Header-From",
        "to": "Header-To",
        "date": "Date",
    }
    found: dict[str, str] = {}
    for line in unfolded.split("\r\n"):
        name, sep, value = line.partition(":")
        key = name.strip().lower()
        if sep and key in wanted and wanted[key] not in found:
            found[wanted[key]] = value.strip()
    return found


async def cmd_flush(spool: Spool, args: argparse.Namespace, out: TextIO) -> int:
    count = await admin.flush(spool, args.ids, domain=args.domain)
    out.write(f"{count} recipient(s) due now\n")
    return EXIT_OK


async def cmd_delete(spool: Spool, args: argparse.Namespace, out: TextIO) -> int:
    if not await admin.message_exists(spool, args.id):
        raise UnknownMessageError(args.id)
    changed = await spool.finalize_message(args.id, Status.DROPPED, reason="deleted by operator")
    if not changed:
        out.write(f"{args.id}: nothing to drop (every recipient is already final)\n")
        return EXIT_OK
    out.write(f"{args.id}: {len(changed)} recipient(s) dropped, no DSN sent\n")
    return EXIT_OK


async def cmd_bounce(spool: Spool, args: argparse.Namespace, out: TextIO, config: Config) -> int:
    from outboundd.delivery.operator import bounce_message

    count, dsn_qid = await bounce_message(spool, config, args.id, reason=args.reason)
    if count == 0:
        out.write(f"{args.id}: nothing to bounce (every recipient is already final)\n")
        return EXIT_OK
    note = f", DSN {dsn_qid} queued" if dsn_qid else ", no DSN sent (null sender or NOTIFY)"
    out.write(f"{args.id}: {count} recipient(s) bounced{note}\n")
    return EXIT_OK


async def cmd_stats(spool: Spool, args: argparse.Namespace, out: TextIO) -> int:
    st = await admin.stats(spool)
    now = time.time()
    oldest = (
        None if st.oldest_deferred_received_at is None else now - st.oldest_deferred_received_at
    )
    if args.json:
        data = to_json(st)
        data["oldest_deferred_age_seconds"] = None if oldest is None else round(oldest)
        data.pop("oldest_deferred_received_at")
        data["top_domains"] = [{"domain": d, "recipients": n} for d, n in st.top_domains]
        json.dump(data, out)
        out.write("\n")
        return EXIT_OK
    w = out.write
    w(f"delivery:        {'PAUSED' if st.paused else 'running'}\n")
    w(f"messages queued: {st.queued_messages} ({human_size(st.queue_bytes)})\n")
    w("recipients:      " + ", ".join(f"{k} {v}" for k, v in st.by_status.items()) + "\n")
    w(f"oldest deferred: {age(oldest) if oldest is not None else '-'}\n")
    w("last hour:       " + ", ".join(f"{k} {v}" for k, v in st.last_hour.items()) + "\n")
    if st.top_domains:
        w("top domains:\n")
        for domain, n in st.top_domains:
            w(f"  {n:>8}  {domain}\n")
    return EXIT_OK


async def cmd_pause(spool: Spool, config: Config, out: TextIO) -> int:
    was_paused = await spool.is_paused()
    await spool.set_paused(True)
    already = " (it already was)" if was_paused else ""
    out.write(
        f"delivery paused{already}: queued mail is kept and accepted mail is queued; "
        "'outboundctl resume' to continue\n"
    )
    return EXIT_OK


async def cmd_resume(spool: Spool, config: Config, out: TextIO) -> int:
    was_paused = await spool.is_paused()
    await spool.set_paused(False)
    already = "" if was_paused else " (it was not paused)"
    if config.outbound.disabled:
        # pause is one switch; outbound.ini's disabled is another, and it wins.
        out.write(f"delivery resumed{already}, but still held: outbound.ini has disabled=true\n")
    else:
        out.write(f"delivery running{already}\n")
    return EXIT_OK


async def cmd_queue_migrate(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """Move the SQLite queue in ``queue_dir`` into the PostgreSQL queue ``--to``."""
    report = await transfer.migrate_queue(config.outbound.queue_dir, args.to)
    if args.json:
        out.write(transfer.report_json(report) + "\n")
        return EXIT_OK
    t = report.copied
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(t.recipients.items())) or "none"
    out.write(
        f"migrated {report.source} to {report.destination} in {report.seconds:.1f} s "
        "(counts verified)\n"
        f"  messages:   {t.messages}\n"
        f"  recipients: {by_status}\n"
        f"  attempts:   {t.attempts}\n"
        f"  bodies:     {t.bodies} ({human_size(t.body_bytes)})\n"
        f"  control:    {', '.join(f'{k}={v}' for k, v in sorted(t.control.items())) or 'none'}\n"
        f"{report.source} is kept as it was, marked MIGRATED: outboundd will not start on it.\n"
        "Next: set queue_url in outbound.ini on every host and start outboundd.\n"
    )
    return EXIT_OK


def cmd_user(config_dir: Path, args: argparse.Namespace, out: TextIO) -> int:
    path = config_dir / "auth_flat_file.ini"
    if args.user_command == "list":
        names = auth_flat_file.list_users(path)
        for name in names:
            out.write(name + "\n")
        if not names:
            print(f"outboundctl: no users in {path}", file=sys.stderr)
        return EXIT_OK
    if args.user_command == "del":
        if not auth_flat_file.delete_user(path, args.name):
            raise CtlError(f"no user {args.name} in {path}")
        out.write(f"user {args.name} deleted\n")
        return EXIT_OK
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise CtlError("the passwords do not match")
    else:
        raise CtlError("give the password on stdin with --password-stdin")
    created = auth_flat_file.add_user(path, args.name, password)
    out.write(f"user {args.name} {'added' if created else 'updated'}\n")
    return EXIT_OK


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outboundctl", description="Inspect and steer the outboundd queue."
    )
    parser.add_argument(
        "-c",
        "--config",
        default="config",
        metavar="CONFIG_DIR",
        help="configuration directory (default: ./config)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list recipients in the queue")
    p.add_argument("--status", choices=STATUSES, help="only this status (default: unfinished)")
    p.add_argument("--domain", help="only this destination domain")
    p.add_argument("--sender", help="only this envelope sender")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="AGE",
        help="only messages received longer ago than AGE (e.g. 2h)",
    )
    p.add_argument("--limit", type=positive_int, metavar="N", help="at most N rows")
    p.add_argument("--json", action="store_true", help="a JSON array for scripts")

    p = sub.add_parser("show", help="one message: envelope, headers, recipients, attempts")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("flush", help="make deferred recipients due now")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--domain", help="only this destination domain")

    p = sub.add_parser("bounce", help="fail every unfinished recipient now and send the DSN")
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--reason", help="why, for the DSN and the record (default: bounced by the operator)"
    )

    p = sub.add_parser("delete", help="drop a message without a DSN")
    p.add_argument("id", metavar="ID")

    p = sub.add_parser("stats", help="queue counts, top domains, last hour")
    p.add_argument("--json", action="store_true")

    sub.add_parser("pause", help="hold all delivery")
    sub.add_parser("resume", help="release delivery")

    p = sub.add_parser("queue", help="operations on the whole queue")
    qsub = p.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    q = qsub.add_parser(
        "migrate",
        help="move this SQLite queue (queue_dir) into PostgreSQL; no outboundd may be running",
    )
    q.add_argument("--to", required=True, metavar="URL", help="postgresql://... of an empty queue")
    q.add_argument("--json", action="store_true", help="the counts as JSON")

    p = sub.add_parser("user", help="manage AUTH users in auth_flat_file.ini")
    usub = p.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    u = usub.add_parser("add", help="add or update a user")
    u.add_argument("name")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u = usub.add_parser("del", help="delete a user")
    u.add_argument("name")
    usub.add_parser("list", help="list user names")

    dkimctl.add_parser(sub)
    return parser


QueueCommand = Callable[[Spool, argparse.Namespace, TextIO], Coroutine[Any, Any, int]]
QUEUE_COMMANDS: dict[str, QueueCommand] = {
    "list": cmd_list,
    "show": cmd_show,
    "flush": cmd_flush,
    "delete": cmd_delete,
    "stats": cmd_stats,
}
SwitchCommand = Callable[[Spool, Config, TextIO], Coroutine[Any, Any, int]]
SWITCH_COMMANDS: dict[str, SwitchCommand] = {"pause": cmd_pause, "resume": cmd_resume}


async def run_queue_command(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    location = config.outbound.queue_location
    try:
        # create=False: a typo in -c must not make a second, empty queue.
        spool = await spool_backend.open(location, recover=False, create=False)
    except sqlite3.Error as exc:
        raise CtlError(
            f"cannot open the queue {spool_backend.describe_location(location)}: {exc}"
        ) from exc
    except SpoolError as exc:
        raise CtlError(str(exc)) from exc
    try:
        if args.command == "bounce":
            return await cmd_bounce(spool, args, out, config)
        if args.command in SWITCH_COMMANDS:
            return await SWITCH_COMMANDS[args.command](spool, config, out)
        return await QUEUE_COMMANDS[args.command](spool, args, out)
    except sqlite3.Error as exc:
        raise CtlError(f"queue database error: {exc}") from exc
    finally:
        await spool.close()


def one_line(exc: BaseException) -> str:
    """An error as the single stderr line the exit-status contract promises."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point; returns the exit status (argparse exits 2 itself on bad usage)."""
    stream = out or sys.stdout
    if isinstance(stream, io.TextIOWrapper):
        # Addresses may be UTF-8 (SMTPUTF8); never die on a C-locale terminal.
        stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)  # exits 2 with usage on bad usage
    config_dir = Path(args.config)
    try:
        if not config_dir.is_dir():
            raise CtlError(f"no configuration directory {config_dir} (give one with -c DIR)")
        if args.command == "user":
            return cmd_user(config_dir, args, stream)
        if args.command == "dkim":
            return dkimctl.run(config_dir, args, stream)
        config = load_config(config_dir)
        if args.command == "queue":
            return asyncio.run(cmd_queue_migrate(config, args, stream))
        return asyncio.run(run_queue_command(config, args, stream))
    except BrokenPipeError:
        # `outboundctl list | head`: the reader left; that is not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ConfigError, CtlError, SpoolError, ValueError, OSError) as exc:
        print(f"outboundctl: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("outboundctl: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
