"""The command line: ``kushi [serve|socks|reverse|tcp|config] ...``.

Flags are turned into a dict keyed like the config file and handed to ``load_config``,
which is the only place options are validated. A bad flag or config value prints one
line naming the key and exits 2; a listener that cannot start prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from kushi import __version__
from kushi.config import DEFAULT_CONNECT_PORTS, GLOBAL_KEYS, LISTENER_KEYS, Config, load_config
from kushi.errors import ConfigError

EXIT_CONFIG = 2
#: Output cut short by a closed pipe (``kushi check --json ... | head``): 128 + SIGPIPE,
#: what a shell reports for a Unix tool stopped the same way.
EXIT_BROKEN_PIPE = 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"kushi: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file; flags override it")
    p.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on (repeatable; IPv6 in brackets, e.g. [::1]:3128)"
        + {
            "forward": " [default: 127.0.0.1:3128 and [::1]:3128]",
            "socks": " [default: 127.0.0.1:1080 and [::1]:1080]",
        }.get(mode, ""),
    )
    p.add_argument(
        "--egress",
        choices=("prefer-ipv6", "ipv6-only", "prefer-ipv4", "ipv4-only"),
        help="address family for outgoing connections [default: prefer-ipv6]",
    )
    p.add_argument(
        "--source",
        action="append",
        metavar="ADDR|PREFIX",
        help="local address outgoing connections leave from, at most one per family "
        "(repeatable: e.g. 203.0.113.7 and 2001:db8:1:2::/64; a prefix needs a local "
        "route, see README) [default: the host's default address]",
    )
    p.add_argument(
        "--source-rotation",
        choices=("none", "connection", "client", "user"),
        help="which address of a source prefix each connection uses: none (the first), "
        "connection (a random one each), client (one per client address), user (one per "
        "authenticated user) [default: none]",
    )
    p.add_argument(
        "--allow",
        action="append",
        metavar="CIDR|HOST",
        help="client addresses allowed (repeatable; a host name is re-resolved periodically) "
        + ("[default: loopback only]" if mode in ("forward", "socks") else "[default: everyone]"),
    )
    p.add_argument(
        "--access-log", metavar="PATH|-", help="access log file, - for stdout, '' for off"
    )
    p.add_argument("--access-log-format", choices=("squid", "json"), help="[default: squid]")
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="[default: info]"
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the listeners [default: 0, one per core]",
    )
    p.add_argument(
        "--nat64",
        choices=("allow", "refuse"),
        help="whether ipv6-only accepts destinations in the NAT64 prefix [default: allow]",
    )
    p.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        action="append",
        help="admin listener for /metrics, the status page and /proxy.pac "
        "[default: 127.0.0.1:9128; off to disable]",
    )


def _tls_flags(p: argparse.ArgumentParser, mode: str) -> None:
    """The listeners that can terminate TLS (serve, reverse)."""
    what = (
        "an https:// proxy: curl -x https://HOST:PORT, a PAC file's HTTPS HOST:PORT"
        if mode == "forward"
        else "HTTPS for the clients; the backend stays plain HTTP"
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        help=f"serve TLS on the listen addresses ({what}) with this certificate chain "
        "(e.g. certbot's fullchain.pem); re-read on SIGHUP; needs --tls-key",
    )
    p.add_argument(
        "--tls-key",
        metavar="PEM",
        help="the certificate's private key (PEM, unencrypted; e.g. certbot's privkey.pem)",
    )


def _proxy_flags(p: argparse.ArgumentParser, mode: str) -> None:
    """Flags of the listeners that connect where their clients say (serve, socks)."""
    ports = ",".join(str(port) for port in sorted(DEFAULT_CONNECT_PORTS[mode]))
    p.add_argument(
        "--connect-ports",
        metavar="PORTS",
        help=f"ports CONNECT may reach, e.g. 443,8443 [default: {ports}]",
    )
    p.add_argument(
        "--allow-destination",
        dest="allow_destinations",
        action="append",
        metavar="CIDR[ PORTS]",
        help="destinations allowed despite the built-in refusals (loopback, link-local, "
        "metadata, multicast, and by default private ranges and this host's own "
        "addresses), e.g. '::1/128' or '10.0.0.0/8 80,443' (repeatable)",
    )
    p.add_argument(
        "--deny-destination",
        dest="deny_destinations",
        action="append",
        metavar="CIDR[ PORTS]",
        help="destinations refused with destination_ip_prohibited (repeatable)",
    )
    p.add_argument(
        "--auth-file",
        metavar="HTPASSWD",
        help=(
            "require Proxy-Authorization: Basic checked against this htpasswd file"
            if mode == "forward"
            else "require SOCKS5 username/password (RFC 1929) checked against this htpasswd file"
        )
        + " (bcrypt entries only: htpasswd -B)",
    )
    p.add_argument(
        "--open",
        action="store_true",
        default=None,
        help="allow starting with a non-loopback listener whose allow list admits everyone",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kushi",
        description="kushi: an HTTP and SOCKS5 proxy that bridges IPv4 and IPv6.",
        epilog="Bare `kushi` is `kushi serve`. See README.md for the config file reference.",
    )
    parser.add_argument("--version", action="version", version=f"kushi {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser(
        "serve",
        help="run the forward proxy (and every listener in --config)",
        description="Forward proxy: IPv4 clients in, IPv6 (first or only) out. The same "
        "port also serves SOCKS5 clients (--no-socks turns that off).",
    )
    _common(serve, "forward")
    _proxy_flags(serve, "forward")
    _tls_flags(serve, "forward")
    serve.add_argument(
        "--no-socks",
        dest="socks",
        action="store_false",
        default=None,
        help="serve only HTTP on this port, not SOCKS5 too (socks = false; with "
        "--tls-cert, SOCKS5 is served inside TLS)",
    )
    socks = sub.add_parser(
        "socks",
        help="run a SOCKS5 proxy (RFC 1928: CONNECT and UDP ASSOCIATE)",
        description="SOCKS5 proxy for ssh, git, mail clients, browsers and any SOCKS "
        "program: IPv4 clients in, IPv6 (first or only) out, names resolved by kushi.",
    )
    _common(socks, "socks")
    _proxy_flags(socks, "socks")

    for mode, what in (
        ("reverse", "HTTP reverse proxy: put an HTTP backend on IPv6"),
        ("tcp", "TCP relay: put any TCP backend on IPv6 (like 6tunnel)"),
    ):
        p = sub.add_parser(mode, help=what, description=what)
        _common(p, mode)
        p.add_argument(
            "--backend",
            action="append",
            required=True,
            metavar="URL" if mode == "reverse" else "HOST:PORT",
            help="backend (repeatable; round-robin)"
            + (", e.g. http://127.0.0.1:8080" if mode == "reverse" else ", e.g. 127.0.0.1:443"),
        )
        p.add_argument(
            "--backend-proxy-protocol",
            type=int,
            choices=(1, 2),
            help="send the client's address to the backend in PROXY protocol v1 or v2",
        )
        if mode == "reverse":
            _tls_flags(p, mode)

    config = sub.add_parser(
        "config", help="check a config file, print the commented example or the systemd unit"
    )
    config_sub = config.add_subparsers(
        dest="config_command", parser_class=_Parser, metavar="{check,example,unit}"
    )
    config.set_defaults(config_usage=config.format_usage())
    check = config_sub.add_parser(
        "check",
        help="validate FILE: exit 0 if good, 2 with the problem, 1 if this host "
        "cannot use a source address it names",
    )
    check.add_argument("file")
    config_sub.add_parser("example", help="print the commented example config")
    config_sub.add_parser(
        "unit", help="print the systemd unit (installs under /opt/kushi; see its comments)"
    )

    whoami = sub.add_parser(
        "whoami",
        help="test server: answers with the client's address, family and request headers",
        description="A dual-stack test server that shows each client how it arrived "
        "(text for curl, HTML for browsers, JSON on Accept: application/json).",
    )
    whoami.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on (repeatable) [default: [::]:8080 and 0.0.0.0:8080]",
    )
    from kushi.tools.check import add_arguments as add_check_arguments

    add_check_arguments(
        sub.add_parser(
            "check",
            help="IPv6 readiness report for URLs: DNS, connect, TLS, HTTP, redirects, page",
            description="Check whether URLs work over IPv6 (and IPv4 for comparison). "
            "Exit 0 when everything works over IPv6, 1 when something fails, 2 for bad "
            "arguments. See `pydoc kushi.tools.check` for the --json schema.",
        )
    )
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as config-file keys; unset flags are left out so the file's values stand."""
    known = LISTENER_KEYS | GLOBAL_KEYS
    out: dict[str, Any] = {
        key: value for key, value in vars(args).items() if key in known and value is not None
    }
    if args.command in ("reverse", "tcp", "socks"):
        out["mode"] = args.command
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(parser, args)
    except BrokenPipeError:
        # The reader went away: say nothing more (no traceback, no second error when
        # Python flushes stdout at exit).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.config_command is None:
            sys.stderr.write(args.config_usage)
            print("kushi config: choose a subcommand: check FILE, example or unit", file=sys.stderr)
            return EXIT_CONFIG
        return config_command(args)
    if args.command == "whoami":
        from kushi.tools.whoami import run as run_whoami

        return run_whoami(args.listen)
    if args.command == "check":
        from kushi.tools.check import command as run_check

        return run_check(args)
    overrides = overrides_from(args)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"kushi: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print_warnings(config)
    return run(config, overrides)


def print_warnings(config: Config) -> None:
    for warning in config.warnings:
        print(f"kushi: warning: {warning}", file=sys.stderr)


def run(config: Config, overrides: dict[str, Any]) -> int:
    from kushi import admin
    from kushi.server import StartupError, configure_logging, serve

    configure_logging(config.log_level)
    try:
        # The admin sockets are bound first, so a port in use is a start-up error (exit 1).
        plan = admin.prepare(config)
        try:
            return serve(config, overrides, **plan.serve_hooks())
        finally:
            plan.close()
    except StartupError as exc:
        print(f"kushi: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found only when opening (a log file removed since loading)
        print(f"kushi: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # pragma: no cover
        return 0


def config_command(args: argparse.Namespace) -> int:
    if args.config_command in ("example", "unit"):
        from importlib.resources import files

        name = "example.toml" if args.config_command == "example" else "kushi.service"
        sys.stdout.write(files("kushi").joinpath(name).read_text(encoding="utf-8"))
        return 0
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"kushi: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print_warnings(config)
    from kushi.server import StartupError, check_sources

    try:
        check_sources(config)  # what serve would refuse to start with, on this host
    except StartupError as exc:
        print(f"kushi: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(f"{c.name} ({c.mode})" for c in config.listeners)
    print(f"{args.file}: OK; listeners: {names}")
    return 0
