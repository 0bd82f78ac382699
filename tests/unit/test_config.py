"""load_config: defaults, then the TOML file, then flags; every bad value names its key."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from kushi.config import (
    EVERYONE,
    LOOPBACK_ONLY,
    Address,
    Config,
    Limits,
    Timeouts,
    load_config,
    parse_hostport,
)
from kushi.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kushi.toml"
    path.write_text(text)
    return str(path)


def config_error(
    tmp_path: Path | None, text: str | None = None, **overrides: object
) -> ConfigError:
    path = toml(tmp_path, text) if tmp_path is not None and text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# --- defaults --------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config()
    assert isinstance(config, Config)
    (listener,) = config.listeners
    assert listener.name == "forward" and listener.mode == "forward"
    assert listener.listen == (Address("127.0.0.1", 3128), Address("::1", 3128))
    assert listener.egress == "prefer-ipv6"
    assert listener.allow == LOOPBACK_ONLY
    assert [str(net) for net in listener.allow] == ["127.0.0.0/8", "::1/128"]
    assert listener.connect_ports == frozenset({443})
    assert listener.nat64 == "allow"
    assert listener.nat64_prefixes == (ipaddress.IPv6Network("64:ff9b::/96"),)
    assert listener.open is False
    assert listener.access_log == "-" and listener.access_log_format == "squid"
    assert listener.backend == ()
    assert config.timeouts == Timeouts()
    assert config.timeouts.happy_eyeballs_delay == 0.25
    assert config.limits == Limits()
    assert config.workers == (os.cpu_count() or 1) and config.log_level == "info"
    assert config.admin_listen == (Address("127.0.0.1", 9128),)
    assert config.source is None


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(AttributeError):
        config.workers = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.listeners[0].egress = "ipv6-only"  # type: ignore[misc]


# --- listen addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:3128", "127.0.0.1", 3128),
        ("[::1]:3128", "::1", 3128),
        ("[::]:0", "::", 0),
        ("[2001:db8::1]:8080", "2001:db8::1", 8080),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80),
        ("  localhost:80 ", "localhost", 80),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
    ],
)
def test_parse_hostport(text: str, host: str, port: int) -> None:
    assert parse_hostport(text, "listen") == Address(host, port)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("::1:3128", "put IPv6 addresses in brackets"),
        ("[::1:3128", "missing ']'"),
        ("[::1]3128", "expected ':PORT' after ']'"),
        ("[nope]:80", "is not an IPv6 address"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number"),
        (":80", "no host"),
        ("nope", "no port"),
    ],
)
def test_parse_hostport_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hostport(text, "listen")
    assert info.value.key == "listen"
    assert problem in info.value.problem
    assert str(info.value).startswith("config error: listen: ")


def test_address_str_brackets_ipv6() -> None:
    assert str(Address("::1", 3128)) == "[::1]:3128"
    assert str(Address("127.0.0.1", 3128)) == "127.0.0.1:3128"
    assert parse_hostport(str(Address("2001:db8::5", 80)), "k") == Address("2001:db8::5", 80)


def test_parse_hostport_default_port() -> None:
    assert parse_hostport("[::1]", "backend", default_port=80) == Address("::1", 80)
    assert parse_hostport("example.test", "backend", default_port=80).port == 80


def test_listen_from_file_and_flag(tmp_path: Path) -> None:
    config = load_config(toml(tmp_path, 'listen = ["[::1]:8000", "127.0.0.1:8000"]\n'))
    assert config.listeners[0].listen == (Address("::1", 8000), Address("127.0.0.1", 8000))
    config = load_config(None, {"listen": ["[::]:3128"]})
    assert config.listeners[0].listen == (Address("::", 3128),)
    assert config_error(None, listen=[]).key == "listen"


# --- file, flags, precedence -----------------------------------------------------------------


def test_file_values_and_flags_override_the_file(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        'egress = "ipv4-only"\nconnect_ports = [443, 8443]\nlog_level = "debug"\n'
        "[timeouts]\nconnect = 3\n[limits]\nmax_connections = 50\n",
    )
    config = load_config(path)
    assert config.listeners[0].egress == "ipv4-only"
    assert config.listeners[0].connect_ports == frozenset({443, 8443})
    assert config.log_level == "debug"
    assert config.timeouts.connect == 3.0 and config.timeouts.idle == Timeouts().idle
    assert config.limits.max_connections == 50
    assert config.source == path
    flagged = load_config(
        path, {"egress": "ipv6-only", "connect_ports": "8443", "log_level": "error", "open": None}
    )
    assert flagged.listeners[0].egress == "ipv6-only"
    assert flagged.listeners[0].connect_ports == frozenset({8443})
    assert flagged.log_level == "error"


def test_unknown_key(tmp_path: Path) -> None:
    exc = config_error(tmp_path, 'egres = "ipv6-only"\n')
    assert exc.key == "egres" and exc.problem == "unknown key"
    exc = config_error(tmp_path, "[timeouts]\nconect = 1\n")
    assert exc.key == "timeouts.conect"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("egress = 5\n", "egress"),
        ('egress = "ipv5"\n', "egress"),
        ('listen = "nope"\n', "listen"),
        ("listen = [1]\n", "listen"),
        ("connect_ports = [0]\n", "connect_ports"),
        ('connect_ports = ["https"]\n', "connect_ports"),
        ("connect_ports = 443\n", "connect_ports"),
        ('open = "yes"\n', "open"),
        ('allow = ["not a network!"]\n', "allow"),
        ('nat64 = "maybe"\n', "nat64"),
        ('nat64_prefixes = ["64:ff9b::/120"]\n', "nat64_prefixes"),
        ('nat64_prefixes = ["192.0.2.0/24"]\n', "nat64_prefixes"),
        ('access_log_format = "xml"\n', "access_log_format"),
        ('log_level = "loud"\n', "log_level"),
        ("workers = 1.5\n", "workers"),
        ("workers = -1\n", "workers"),
        ('[timeouts]\nconnect = "soon"\n', "timeouts.connect"),
        ("[timeouts]\nconnect = -1\n", "timeouts.connect"),
        ("[limits]\nmax_connections = 1.5\n", "limits.max_connections"),
        ("timeouts = 5\n", "timeouts"),
        ('listener = "x"\n', "listener"),
    ],
)
def test_wrong_type_or_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert config_error(tmp_path, text).key == key


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "egress = \n")
    assert exc.key == "config" and "not valid TOML" in exc.problem
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.toml"))
    assert info.value.key == "config" and "no such file" in info.value.problem


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("egress", "ipv5"),
        ("listen", ["nope"]),
        ("connect_ports", "0"),
        ("connect_ports", "443,x"),
        ("allow", ["300.1.2.3/8"]),
    ],
)
def test_bad_flag_values_name_the_key(flag: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {flag: value})
    assert info.value.key == flag


def test_connect_ports_flag_forms() -> None:
    config = load_config(None, {"connect_ports": "443, 8443,563"})
    assert config.listeners[0].connect_ports == frozenset({443, 8443, 563})


# --- allow list and the open-proxy guard -----------------------------------------------------


def test_allow_entries_normalised() -> None:
    config = load_config(
        None,
        {"allow": ["198.51.100.7", "::ffff:198.51.100.0/120", "2001:DB8::/32", "Home.Example."]},
    )
    # Networks are parsed once, at load; a host name stays a name (re-resolved at run time).
    assert config.listeners[0].allow == (
        ipaddress.ip_network("198.51.100.7/32"),
        ipaddress.ip_network("198.51.100.0/24"),  # IPv4-mapped is the IPv4 network it carries
        ipaddress.ip_network("2001:db8::/32"),
        "home.example",
    )


def test_public_listener_admitting_everyone_refused_unless_open() -> None:
    exc = config_error(None, listen=["0.0.0.0:3128"], allow=["0.0.0.0/0"])
    assert exc.key == "listener forward: allow"
    assert "open proxy" in exc.problem and "0.0.0.0:3128" in exc.problem
    exc = config_error(None, listen=["[::]:3128"], allow=["::/0"])
    assert exc.key == "listener forward: allow"
    config = load_config(None, {"listen": ["0.0.0.0:3128"], "allow": ["0.0.0.0/0"], "open": True})
    assert config.listeners[0].open is True
    # Loopback listeners, or a narrowed allow list, are not open proxies.
    load_config(None, {"listen": ["127.0.0.1:3128"], "allow": [str(net) for net in EVERYONE]})
    load_config(None, {"listen": ["0.0.0.0:3128"], "allow": ["198.51.100.0/24"]})


def test_admin_listener_admitting_everyone_refused() -> None:
    exc = config_error(None, admin_listen=["0.0.0.0:9090"], admin_allow=["0.0.0.0/0"])
    assert exc.key == "admin_allow"
    config = load_config(None, {"admin_listen": ["127.0.0.1:9090"]})
    assert config.admin_listen == (Address("127.0.0.1", 9090),)


def test_workers_zero_means_one_per_core() -> None:
    assert load_config(None, {"workers": 0}).workers == (os.cpu_count() or 1)


# --- [[listener]] tables ---------------------------------------------------------------------


def test_listener_tables_reverse_tcp_and_forward(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        'egress = "ipv6-only"\n'
        "[[listener]]\n"
        'name = "proxy"\nlisten = ["127.0.0.1:3128"]\n'
        "[[listener]]\n"
        'mode = "reverse"\nlisten = ["[::]:8080"]\nbackend = ["http://127.0.0.1:8080"]\n'
        'egress = "ipv4-only"\n'
        "[[listener]]\n"
        'name = "ssh"\nmode = "tcp"\nlisten = ["[::]:2222"]\nbackend = ["127.0.0.1:22"]\n',
    )
    config = load_config(path)
    proxy, reverse, ssh = config.listeners
    assert (proxy.name, proxy.mode, proxy.egress) == ("proxy", "forward", "ipv6-only")
    assert proxy.allow == LOOPBACK_ONLY
    assert reverse.name == "reverse1" and reverse.mode == "reverse"
    assert reverse.egress == "ipv4-only"  # the table's own value beats the inherited one
    assert reverse.backend == ("http://127.0.0.1:8080",)
    assert reverse.allow == EVERYONE  # reverse and tcp listeners serve everyone by default
    assert reverse.listen == (Address("::", 8080),)
    assert (ssh.mode, ssh.backend, ssh.egress) == ("tcp", ("127.0.0.1:22",), "ipv6-only")
    assert config.listener("ssh") is ssh
    with pytest.raises(KeyError):
        config.listener("nope")


def test_flags_override_listener_tables(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        '[[listener]]\nlisten = ["127.0.0.1:3128"]\negress = "ipv4-only"\n',
    )
    assert load_config(path, {"egress": "prefer-ipv4"}).listeners[0].egress == "prefer-ipv4"
    exc = config_error(tmp_path, '[[listener]]\nlisten = ["127.0.0.1:3128"]\n', listen=["[::1]:1"])
    assert exc.key == "listen" and "[[listener]]" in exc.problem


def test_reverse_listener_needs_a_backend(tmp_path: Path) -> None:
    exc = config_error(
        tmp_path, '[[listener]]\nname = "web"\nmode = "reverse"\nlisten = ["[::]:80"]\n'
    )
    assert exc.key == "listener web: backend"
    assert "needs at least one backend" in exc.problem


def test_forward_listener_must_not_have_a_backend(tmp_path: Path) -> None:
    exc = config_error(
        tmp_path,
        '[[listener]]\nname = "fw"\nlisten = ["127.0.0.1:3128"]\nbackend = ["http://[::1]:80"]\n',
    )
    assert exc.key == "listener fw: backend"
    assert "forward listener has no backend" in exc.problem


@pytest.mark.parametrize(
    ("table", "key"),
    [
        pytest.param(
            'mode = "reverse"\nbackend = ["http://127.0.0.1:80"]\n', "listener reverse0: listen"
        ),
        pytest.param(
            'mode = "reverse"\nlisten = ["[::]:80"]\nbackend = ["ftp://127.0.0.1"]\n',
            "listener reverse0: backend",
        ),
        pytest.param(
            'mode = "tcp"\nlisten = ["[::]:80"]\nbackend = ["127.0.0.1"]\n',
            "listener tcp0: backend",
        ),
        pytest.param('listen = ["127.0.0.1:1"]\ncolour = "red"\n', "listener forward0: colour"),
        ('name = ""\nlisten = ["127.0.0.1:1"]\n', "listener[0].name"),
        ('mode = "sock5"\nlisten = ["127.0.0.1:1"]\n', "listener sock50: mode"),
        ('mode = "socks"\nlisten = ["[::]:1080"]\nallow = ["::/0"]\n', "listener socks0: allow"),
        (
            'mode = "socks"\nlisten = ["127.0.0.1:1"]\nbackend = ["127.0.0.1:1"]\n',
            "listener socks0: backend",
        ),
        pytest.param(
            'listen = ["127.0.0.1:1"]\nproxy_protocol = true\n',
            "listener forward0: proxy_protocol_from",
        ),
    ],
)
def test_listener_table_errors_name_the_listener_and_key(
    tmp_path: Path, table: str, key: str
) -> None:
    assert config_error(tmp_path, "[[listener]]\n" + table).key == key


def test_listener_names_must_be_unique(tmp_path: Path) -> None:
    text = '[[listener]]\nname = "a"\nlisten = ["127.0.0.1:1"]\n' * 2
    assert config_error(tmp_path, text).key == "listener.name"


def test_socks_listener_defaults() -> None:
    from kushi.cli import build_parser, overrides_from
    from kushi.runtime import ListenerState

    args = build_parser().parse_args(["socks"])
    config = load_config(None, overrides_from(args))
    (listener,) = config.listeners
    assert listener.mode == "socks"
    assert [str(a) for a in listener.listen] == ["127.0.0.1:1080", "[::1]:1080"]
    assert [str(net) for net in listener.allow] == ["127.0.0.0/8", "::1/128"]
    assert listener.connect_ports == frozenset({22, 80, 443, 465, 587, 993, 995})
    assert 25 not in listener.connect_ports
    # The destination policy is built for socks listeners, as for forward ones.
    state = ListenerState(listener, config)
    assert state.destinations is not None
    assert state.destinations(ipaddress.ip_address("127.0.0.1"), 80) is not None
    # A forward listener keeps its own defaults and serves SOCKS5 unless told not to.
    forward = load_config(None).listeners[0]
    assert forward.connect_ports == frozenset({443}) and forward.socks is True
    no_socks = build_parser().parse_args(["serve", "--no-socks"])
    assert load_config(None, overrides_from(no_socks)).listeners[0].socks is False


def test_socks_listener_is_no_open_proxy() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"mode": "socks", "listen": ["0.0.0.0:1080"], "allow": ["0.0.0.0/0"]})
    assert caught.value.key == "listener socks: allow"
    assert "open proxy" in caught.value.problem
    ok = load_config(
        None,
        {"mode": "socks", "listen": ["0.0.0.0:1080"], "allow": ["0.0.0.0/0"], "open": True},
    )
    assert ok.listeners[0].open


def test_auth_users_is_derived_from_the_file_not_a_key(tmp_path: Path) -> None:
    """The htpasswd file is read once, at load; its users are not a key anyone can set."""
    import bcrypt

    from kushi.config import load_config

    pw = tmp_path / "pw"
    pw.write_text("ann:" + bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode() + "\n")
    config = load_config(overrides={"auth_file": str(pw), "listen": ["127.0.0.1:3128"]})
    assert [user for user, _ in config.listeners[0].auth_users] == ["ann"]
    toml = tmp_path / "k.toml"
    toml.write_text('auth_users = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(str(toml))
    assert "auth_users" in str(err.value) and "unknown key" in str(err.value)


def test_resolver_keys(tmp_path: Path) -> None:
    text = (
        'dns_servers = ["192.0.2.53", "[2001:db8::53]:5353", "198.51.100.53:5300"]\n'
        "dns_cache_min_ttl = 5\ndns_cache_max_ttl = 600\ndns_cache_size = 100\n"
        'nat64_synthesis = "on"\nnat64_prefix = "2001:db8:64::/64"\n'
        "[timeouts]\nresolution_delay = 0.1\n"
    )
    config = load_config(toml(tmp_path, text))
    assert config.dns_servers == (
        ("192.0.2.53", 53),
        ("2001:db8::53", 5353),
        ("198.51.100.53", 5300),
    )
    assert (config.dns_cache_min_ttl, config.dns_cache_max_ttl) == (5.0, 600.0)
    assert config.dns_cache_size == 100
    assert config.nat64_synthesis == "on"
    assert str(config.nat64_prefix) == "2001:db8:64::/64"
    assert config.timeouts.resolution_delay == 0.1
    # The older key sets the maximum.
    assert load_config(toml(tmp_path, "dns_cache_ttl = 45\n")).dns_cache_max_ttl == 45.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('dns_servers = ["ns.example"]', "dns_servers"),
        ('dns_servers = ["192.0.2.1:99999"]', "dns_servers"),
        ('nat64_prefix = "2001:db8::/97"', "nat64_prefix"),
        ('nat64_prefix = "192.0.2.0/24"', "nat64_prefix"),
        ('nat64_synthesis = "maybe"', "nat64_synthesis"),
        ("dns_cache_size = 0", "dns_cache_size"),
    ],
)
def test_resolver_keys_rejected(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(toml(tmp_path, text + "\n"))
    assert info.value.key == key
