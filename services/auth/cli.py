"""``emotion-stream users add|passwd|remove|token|revoke|list``: users and API tokens in the
recorder's database (``--database``, as the recorder's; it may be running meanwhile).
Passwords are read from the terminal, or from standard input with --password-stdin."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from services.common.config import ServiceParser

from .directory import Directory, DirectoryError
from .principal import ROLES, parse_streams


def build_parser() -> ServiceParser:
    from services.recorder.service import DEFAULT_DATABASE

    parser = ServiceParser(prog="emotion-stream users", description="Users and API tokens of the web pages.")
    parser.option("--database", default=DEFAULT_DATABASE, help="the recorder's database (as its --database)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="viewer")
    add.add_argument("--streams", default="", help="streams the user may see, a,b (default: all)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd = commands.add_parser("passwd", help="set a user's password (ends its sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    token = commands.add_parser("token", help="make an API token and print it (shown only now)")
    token.add_argument("name", help="what the token is for, e.g. grafana")
    token.add_argument("--role", choices=ROLES, default="viewer")
    token.add_argument("--streams", default="", help="streams the token may see, a,b (default: all)")
    revoke = commands.add_parser("revoke", help="revoke an API token by its id (see list)")
    revoke.add_argument("id", type=int)
    commands.add_parser("list", help="users and tokens (never the tokens themselves)")
    return parser


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise DirectoryError("the passwords differ")
    return first


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.recorder import store

    engine = store.make_engine(args.database)
    store.migrate(engine)  # a no-op when the recorder made the schema already
    directory = Directory(engine)
    actor, client = f"cli:{getpass.getuser()}", "local"
    try:
        if args.command == "add":
            directory.add_user(args.name, _password(args), args.role, parse_streams(args.streams))
            directory.audit(actor, "user_added", args.name, client, f"role={args.role}")
        elif args.command == "passwd":
            directory.change_user(args.name, password=_password(args))
            directory.audit(actor, "user_changed", args.name, client, "password")
        elif args.command == "remove":
            directory.remove_user(args.name)
            directory.audit(actor, "user_removed", args.name, client)
        elif args.command == "token":
            pk, token = directory.create_token(args.name, args.role, parse_streams(args.streams), actor)
            directory.audit(actor, "token_created", f"{pk} {args.name}", client, f"role={args.role}")
            print(token)
        elif args.command == "revoke":
            directory.revoke_token(args.id)
            directory.audit(actor, "token_revoked", str(args.id), client)
        else:
            print(json.dumps({"users": directory.list_users(), "tokens": directory.list_tokens()}, indent=1))
    except DirectoryError as error:
        print(f"emotion-stream users: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
