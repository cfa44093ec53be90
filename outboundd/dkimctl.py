"""``outboundctl dkim keygen|show``: make a domain's key and print its DNS record.

Kept apart from ``ctl.py`` (the queue commands): it needs no queue, only the
configuration directory, and shares the key layout with the daemon through
:mod:`outboundd.dkimkeys`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TextIO

from outboundd.config import parse_ini
from outboundd.dkimkeys import (
    KEY_TYPES,
    DkimKeyError,
    KeyType,
    check_domain,
    dns_record,
    generate_key,
    key_files,
    load_domain_keys,
)

__all__ = ["add_parser", "default_selector", "run"]


def default_selector(key_type: KeyType, now: float) -> str:
    """Haraka's style, month and year (``dec2026``); ``ed`` appended for Ed25519
    so a domain's two keys never share a DNS name."""
    stamp = time.strftime("%b%Y", time.gmtime(now)).lower()
    return stamp if key_type == "rsa" else f"{stamp}ed"


def _ini_selector(config_dir: Path) -> str | None:
    """``dkim.ini [sign] selector``, the default for a domain without a selector file."""
    path = config_dir / "dkim.ini"
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DkimKeyError(f"{path}: cannot be read: {exc}") from None
    entry = parse_ini(text, str(path)).sections.get("sign", {}).get("selector")
    value = entry.value if entry is not None else None
    return value if isinstance(value, str) and value else None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``dkim`` command and its two actions."""
    p = sub.add_parser("dkim", help="DKIM keys: make one, print its DNS record")
    dsub = p.add_subparsers(dest="dkim_command", required=True, metavar="ACTION")
    k = dsub.add_parser("keygen", help="make a key for DOMAIN and print the TXT record")
    k.add_argument("domain", metavar="DOMAIN")
    k.add_argument("--selector", help="the selector (default: month and year, e.g. dec2026)")
    k.add_argument("--type", choices=KEY_TYPES, default="rsa", help="key type (default: rsa)")
    s = dsub.add_parser("show", help="print the TXT record of DOMAIN's keys")
    s.add_argument("domain", metavar="DOMAIN")


def run(config_dir: Path, args: argparse.Namespace, out: TextIO) -> int:
    """Run ``outboundctl dkim ...``; :class:`DkimKeyError` (one line) on failure."""
    dkim_dir = config_dir / "dkim"
    domain = check_domain(args.domain)
    if args.dkim_command == "keygen":
        key_type: KeyType = "ed25519" if args.type == "ed25519" else "rsa"
        selector = args.selector or default_selector(key_type, time.time())
        domain_dir = dkim_dir / domain
        fallback = _ini_selector(config_dir)
        others = load_domain_keys(domain_dir, domain, fallback) if domain_dir.is_dir() else ()
        clash = [k for k in others if k.type != key_type and k.selector == selector]
        if clash:
            raise DkimKeyError(
                f"selector {selector} is already used by {domain}'s {clash[0].type} key; "
                "give the new key its own with --selector"
            )
        key = generate_key(dkim_dir, domain, selector, key_type)
        private_name, selector_name = key_files(key_type)
        out.write(
            f"wrote {domain_dir / private_name} (mode 0600) and {domain_dir / selector_name}\n"
            f"publish this record in DNS, then restart outboundd:\n{dns_record(key)}\n"
        )
        return 0
    keys = load_domain_keys(dkim_dir / domain, domain, _ini_selector(config_dir))
    if not keys:
        raise DkimKeyError(
            f"no DKIM key for {domain} in {dkim_dir / domain} "
            f"(make one with: outboundctl dkim keygen {domain})"
        )
    for key in keys:
        out.write(dns_record(key) + "\n")
    return 0
