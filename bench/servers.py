"""The servers under test: the nginx origin and each proxy row, with generated configs.

Every server runs in the foreground from its own directory under bench/work/, with its own
config, pid file and logs, on free ports, and is stopped by the harness (see procs.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.procs import BenchError, Managed, clean_env, free_port

REPO = Path(__file__).resolve().parent.parent
KUSHI = REPO / ".venv" / "bin" / "kushi"

Kind = Literal["direct", "forward", "reverse", "tcp"]


@dataclass
class Env:
    """What every server needs to know: where to put files and where the origin is."""

    work: Path
    www: Path
    origin_port: int = 0

    @property
    def origin_authority(self) -> str:
        return f"[::1]:{self.origin_port}"

    @property
    def origin_url(self) -> str:
        return f"http://{self.origin_authority}"

    def dir(self, name: str) -> Path:
        d = self.work / "servers" / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Running:
    """A started server: the process (None for the direct row) and where clients connect."""

    managed: Managed | None
    host: str
    port: int

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class Row:
    name: str
    kind: Kind
    description: str
    start: Callable[[Env], Running]
    # Returns None when the row can run, or a sentence saying why it is skipped.
    available: Callable[[Env], str | None]
    #: Only the big downloads (no wrk, no ab): a variant that differs in its tunnels only.
    bulk_only: bool = False


def _which(binary: str) -> Callable[[Env], str | None]:
    def check(_env: Env) -> str | None:
        if shutil.which(binary) is None:
            return f"`{binary}` is not installed"
        return None

    return check


def _always(_env: Env) -> str | None:
    return None


# ---------------------------------------------------------------------------------------------
# nginx: the origin and the reverse-proxy row

_NGINX_TEMP = """\
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
"""


def _nginx_conf(d: Path, http_body: str) -> str:
    (d / "tmp").mkdir(exist_ok=True)
    return f"""\
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{_NGINX_TEMP.format(d=d)}
    keepalive_requests 1000000;
    keepalive_timeout 65;
{http_body}
}}
"""


def _check_config(what: str, argv: list[str]) -> None:
    """Run a server's own config check (``nginx -t``, ``haproxy -c``, ``squid -k parse``)."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=clean_env())
    if res.returncode != 0:
        raise BenchError(f"{what} failed: {(res.stdout + res.stderr).strip()[-500:]}")


def _start_nginx(name: str, d: Path, conf: str) -> Managed:
    (d / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = [nginx, "-p", f"{d}/", "-c", str(d / "nginx.conf")]
    _check_config(f"{name}: nginx -t", [*argv, "-t", "-q"])
    m = Managed(name, argv, cwd=d, log=d / "stdout.log", pidfile=d / "nginx.pid")
    m.start()
    return m


def start_origin(env: Env) -> Running:
    d = env.dir("origin")
    env.origin_port = free_port()
    body = f"""\
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen [::1]:{env.origin_port};
        root {env.www};
        location = /ip {{
            default_type text/plain;
            return 200 "$remote_addr\\n";
        }}
        location / {{
        }}
    }}"""
    m = _start_nginx("nginx-origin", d, _nginx_conf(d, body))
    m.wait_port("::1", env.origin_port)
    return Running(m, "::1", env.origin_port)


def start_direct(env: Env) -> Running:
    return Running(None, "::1", env.origin_port)


def start_nginx_reverse(env: Env) -> Running:
    d = env.dir("nginx-reverse")
    port = free_port()
    body = f"""\
    upstream origin {{
        server {env.origin_authority};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    m = _start_nginx("nginx-reverse", d, _nginx_conf(d, body))
    m.wait_port("127.0.0.1", port)
    return Running(m, "127.0.0.1", port)


# ---------------------------------------------------------------------------------------------
# HAProxy (reverse)


def _haproxy(mode: str) -> Callable[[Env], Running]:
    """HAProxy, one thread: an HTTP reverse proxy reusing upstream connections, or a plain
    TCP relay (``mode tcp``), in front of the origin."""

    def start(env: Env) -> Running:
        name = "haproxy" if mode == "http" else f"haproxy-{mode}"
        d = env.dir(name)
        port = free_port()
        if mode == "http":
            body = f"""\
    option http-keep-alive
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:{port}
    default_backend origin

backend origin
    http-reuse always
    server origin {env.origin_authority}
"""
        else:
            body = f"""\

listen relay
    bind 127.0.0.1:{port}
    server origin {env.origin_authority}
"""
        conf = f"""\
global
    nbthread 1
    maxconn 4096
    pidfile {d}/haproxy.pid

defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{body}"""
        cfg = d / "haproxy.cfg"
        cfg.write_text(conf)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        _check_config("haproxy -c", [haproxy, "-c", "-q", "-f", str(cfg)])
        m = Managed(name, [haproxy, "-db", "-f", str(cfg)], cwd=d, log=d / "stdout.log")
        m.start()
        m.wait_port("127.0.0.1", port)
        return Running(m, "127.0.0.1", port)

    return start


# ---------------------------------------------------------------------------------------------
# Squid (forward)

_SQUID_USER = "proxy"


def start_squid(env: Env) -> Running:
    d = env.dir("squid")
    port = free_port()
    conf = f"""\
http_port 127.0.0.1:{port}
workers 1
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache_store_log none
coredump_dir {d}
netdb_filename none
pinger_enable off
logfile_rotate 0
shutdown_lifetime 0 seconds
max_filedescriptors 8192

# no caching
cache deny all
cache_mem 0 MB

acl SSL_ports port {env.origin_port}
acl Safe_ports port {env.origin_port}
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow localhost
http_access deny all
"""
    if os.geteuid() == 0:
        conf += f"cache_effective_user {_SQUID_USER}\n"
        shutil.chown(d, user=_SQUID_USER, group=_SQUID_USER)
        for f in d.iterdir():
            shutil.chown(f, user=_SQUID_USER, group=_SQUID_USER)
    cfg = d / "squid.conf"
    cfg.write_text(conf)
    squid = shutil.which("squid") or "/usr/sbin/squid"
    _check_config("squid -k parse", [squid, "-k", "parse", "-f", str(cfg)])
    m = Managed("squid", [squid, "-N", "-f", str(cfg)], cwd=d, log=d / "stdout.log")
    m.start()
    m.wait_port("127.0.0.1", port)
    return Running(m, "127.0.0.1", port)


# ---------------------------------------------------------------------------------------------
# tinyproxy (forward)


def start_tinyproxy(env: Env) -> Running:
    d = env.dir("tinyproxy")
    port = free_port()
    conf = f"""\
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 1024
Allow 127.0.0.1
ConnectPort {env.origin_port}
DisableViaHeader Yes
PidFile "{d}/tinyproxy.pid"
LogFile "{d}/tinyproxy.log"
LogLevel Error
"""
    if os.geteuid() == 0:
        conf += "User nobody\nGroup nogroup\n"
        shutil.chown(d, user="nobody", group="nogroup")
    cfg = d / "tinyproxy.conf"
    cfg.write_text(conf)
    tp = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    m = Managed("tinyproxy", [tp, "-d", "-c", str(cfg)], cwd=d, log=d / "stdout.log")
    m.start()
    m.wait_port("127.0.0.1", port)
    return Running(m, "127.0.0.1", port)


# ---------------------------------------------------------------------------------------------
# proxy.py (forward), installed into its own venv on first use


def proxypy_bin(env: Env) -> Path:
    return env.work / "proxypy-venv" / "bin" / "proxy"


def ensure_proxypy(env: Env) -> str | None:
    """Install proxy.py into bench/work/proxypy-venv if needed; None or why it can't be."""
    binary = proxypy_bin(env)
    if binary.exists():
        return None
    venv = binary.parent.parent
    print(f"bench: installing proxy.py into {venv} ...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run(
            [base, "-m", "venv", "--clear", str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "proxy.py"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"proxy.py could not be installed: {exc}"
    if pip.returncode != 0 or not binary.exists():
        tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["?"]
        return f"proxy.py could not be installed (pip: {tail[0][:200]})"
    return None


def start_proxypy(env: Env) -> Running:
    d = env.dir("proxypy")
    port = free_port()
    argv = [
        str(proxypy_bin(env)),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-workers",
        "2",
        "--log-level",
        "ERROR",
        "--pid-file",
        str(d / "proxy.pid"),
        # proxy.py cannot reach an IPv6-literal origin by itself; see bench/proxypy_ipv6.py.
        "--plugins",
        "bench.proxypy_ipv6.BracketedIPv6",
    ]
    m = Managed("proxy.py", argv, cwd=d, log=d / "stdout.log")
    m.start(env=clean_env({"PYTHONPATH": str(REPO)}))
    m.wait_port("127.0.0.1", port, timeout=30)
    return Running(m, "127.0.0.1", port)


# ---------------------------------------------------------------------------------------------
# kushi


def kushi_available(_env: Env) -> str | None:
    if not KUSHI.exists():
        return f"kushi is not installed ({KUSHI.relative_to(REPO)} missing; run `make run` once)"
    try:
        probe = subprocess.run(
            [str(KUSHI), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`kushi serve --help` failed: {exc}"
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or ["(no output)"]
        return f"`kushi serve --help` exited {probe.returncode}: {lines[-1][:200]}"
    return None


def _start_kushi(name: str, env: Env, toml: str, port: int) -> Running:
    d = env.dir(name)
    cfg = env.work / f"{name}.toml"
    cfg.write_text(toml)
    # The command line the issue fixes: paths relative to the repository.
    argv = [str(KUSHI.relative_to(REPO)), "serve", "--config", str(cfg.relative_to(REPO))]
    m = Managed(name, argv, cwd=REPO, log=d / "stdout.log")
    m.start()
    m.wait_port("127.0.0.1", port, timeout=30)
    return Running(m, "127.0.0.1", port)


def _kushi_forward(workers: int, splice: bool = True) -> Callable[[Env], Running]:
    def start(env: Env) -> Running:
        port = free_port()
        toml = f"""\
listen = ["127.0.0.1:{port}"]
allow = ["127.0.0.0/8", "::1/128"]
connect_ports = [{env.origin_port}]
# kushi refuses loopback destinations unless excepted; the origin is [::1] on this port.
allow_destinations = ["::1/128 {env.origin_port}"]
egress = "prefer-ipv6"
access_log = ""          # off
log_level = "warning"
workers = {workers}
splice = {"true" if splice else "false"}
"""
        name = "kushi" if workers == 1 else f"kushi-w{workers}"
        return _start_kushi(name if splice else f"{name}-copy", env, toml, port)

    return start


def _kushi_listener(mode: str, splice: bool = True) -> Callable[[Env], Running]:
    """kushi with one reverse or tcp ``[[listener]]`` in front of the origin, 1 worker."""

    def start(env: Env) -> Running:
        port = free_port()
        backend = env.origin_url if mode == "reverse" else env.origin_authority
        toml = f"""\
access_log = ""          # off
log_level = "warning"
workers = 1
splice = {"true" if splice else "false"}

[[listener]]
mode = "{mode}"
listen = ["127.0.0.1:{port}"]
backend = ["{backend}"]
"""
        name = f"kushi-{mode}" if splice else f"kushi-{mode}-copy"
        return _start_kushi(name, env, toml, port)

    return start


# ---------------------------------------------------------------------------------------------
# The rows, in table order

ROWS: list[Row] = [
    Row("direct", "direct", "client straight to the nginx origin on [::1]", start_direct, _always),
    Row("squid", "forward", "Squid, 1 process (workers 1), no cache", start_squid, _which("squid")),
    Row(
        "tinyproxy",
        "forward",
        "tinyproxy, 1 process (threads)",
        start_tinyproxy,
        _which("tinyproxy"),
    ),
    Row("proxy.py", "forward", "proxy.py --num-workers 2", start_proxypy, ensure_proxypy),
    Row("kushi", "forward", "kushi forward, workers = 1", _kushi_forward(1), kushi_available),
    Row("kushi-w2", "forward", "kushi forward, workers = 2", _kushi_forward(2), kushi_available),
    Row(
        "kushi-copy",
        "forward",
        "kushi forward, workers = 1, `splice = false`: tunnels copied through kushi (bulk only)",
        _kushi_forward(1, splice=False),
        kushi_available,
        bulk_only=True,
    ),
    Row(
        "nginx-reverse",
        "reverse",
        "nginx reverse proxy, 1 worker, keepalive upstream",
        start_nginx_reverse,
        _which("nginx"),
    ),
    Row("haproxy", "reverse", "HAProxy, nbthread 1", _haproxy("http"), _which("haproxy")),
    Row(
        "kushi-reverse",
        "reverse",
        "kushi reverse listener, workers = 1",
        _kushi_listener("reverse"),
        kushi_available,
    ),
    Row(
        "haproxy-tcp",
        "tcp",
        "HAProxy, mode tcp, nbthread 1",
        _haproxy("tcp"),
        _which("haproxy"),
    ),
    Row(
        "kushi-tcp",
        "tcp",
        "kushi tcp listener, workers = 1",
        _kushi_listener("tcp"),
        kushi_available,
    ),
    Row(
        "kushi-tcp-copy",
        "tcp",
        "kushi tcp listener, workers = 1, `splice = false` (bulk only)",
        _kushi_listener("tcp", splice=False),
        kushi_available,
        bulk_only=True,
    ),
]

ROW_NAMES = [r.name for r in ROWS]
