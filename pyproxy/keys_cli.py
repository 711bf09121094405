"""``python -m pyproxy keys new|list``: manage the client keys file.

``keys new`` prints a new key once (it is not stored anywhere: only its hash is
appended to the file) and ``keys list`` shows names and limits, with a short
prefix of each hash at most. A mistake is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, NoReturn

from pyproxy.gateway.config import NAME_RE
from pyproxy.gateway.keys import KeysError, Limits, key_entry_toml, key_hash, load_keys, new_key, short_hash

EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"pyproxy keys: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


def _name(value: str) -> str:
    if not NAME_RE.match(value):
        raise argparse.ArgumentTypeError(f"expected a name of [a-z0-9_-], got {value!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="pyproxy keys", description="Manage the client keys file ([auth] keys_file).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    new = sub.add_parser("new", help="make a key, append its hash to the file, print the key once")
    new.add_argument("--name", required=True, type=_name)
    new.add_argument("--file", required=True, help="the keys file (created if missing)")
    new.add_argument("--tenant", type=_name, help="default: the name")
    new.add_argument("--models", help="comma-separated public model names or globs it may use (default: all)")
    new.add_argument("--rpm", type=_positive)
    new.add_argument("--tpm", type=_positive)
    new.add_argument("--max-parallel", dest="max_parallel", type=_positive)
    listing = sub.add_parser("list", help="names, tenants and limits (never a whole hash)")
    listing.add_argument("--file", required=True)
    return parser


def main(argv: List[str]) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "new":
            return _new(args)
        return _list(args)
    except KeysError as exc:
        sys.stderr.write(f"pyproxy keys: error: {exc}\n")
        return EXIT_USAGE


def _new(args: argparse.Namespace) -> int:
    if os.path.exists(args.file):
        table = load_keys(args.file)  # refuses a file that would not load afterwards
        if args.name in table.names:
            raise KeysError(f"{args.file}: a key named {args.name!r} exists already")
    key = new_key()
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else []
    entry = key_entry_toml(args.name, key_hash(key), args.tenant, models, Limits(args.rpm, args.tpm, args.max_parallel))
    # Appended in one write, and the file made private on creation: it names who may
    # use the gateway, even without the keys.
    fd = os.open(args.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(entry)
    load_keys(args.file)  # what was written loads
    sys.stdout.write(key + "\n")
    sys.stderr.write(f"pyproxy keys: added {args.name!r} to {args.file}; the key above is shown only this once\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    table = load_keys(args.file)
    keys = sorted(table.by_digest.values(), key=lambda k: table.names.index(k.name))
    rows = [("NAME", "TENANT", "MODELS", "RPM", "TPM", "MAX_PARALLEL", "STATE", "HASH")]
    for key in keys:
        limits = key.limits
        state = "disabled" if key.disabled else ("expires" if key.expires is not None else "active")
        rows.append(
            (
                key.name,
                key.tenant,
                ",".join(key.models) or "*",
                *(
                    str(getattr(limits, f)) if getattr(limits, f) is not None else "-"
                    for f in ("rpm", "tpm", "max_parallel")
                ),
                state,
                short_hash(key),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    return 0
