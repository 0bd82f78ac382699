"""Network-namespace topologies for kushi's end-to-end tests.

Everything here needs root and a working ``ip netns``; call :func:`netns_available` first and
skip with its reason when it returns a string.

Naming: a :class:`Topology` claims a *group* ``kt<pid % 10000>-<serial>`` and its hosts are the
namespaces ``<group>-<host>`` (e.g. ``kt1234-0-proxy``).  The claim is a file
``/run/kushi-test-netns/<group>`` holding the owner's pid and start time, written before any
namespace exists; groups whose owner is dead (a crashed earlier run) are removed when the next
topology is built.  Veth pairs are created directly inside their namespaces (nothing is added to
the root namespace), so interface names only need to be unique per namespace (<= 15 chars).

A topology is removed (processes in it killed, namespaces, their veths and bridges and the
``/etc/netns/<ns>`` directories deleted) by ``close()``/``__exit__``, at interpreter exit and
on SIGTERM.

Only 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32 are used for addresses.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
OWNER_DIR = Path("/run/kushi-test-netns")
_GROUP_RE = re.compile(r"^(kt\d{1,4}-\d+)(?:-|$)")
_HOST_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.RLock()
_live: list[Topology] = []
_popens: list[tuple[str | None, subprocess.Popen[Any]]] = []
_handlers_installed = False


class NetnsError(RuntimeError):
    """An ``ip`` command (or other namespace operation) failed."""


# ---------------------------------------------------------------------------------------------
# Low-level helpers


def _ns_name(ns: Host | str | None) -> str | None:
    if ns is None:
        return None
    return ns.ns if isinstance(ns, Host) else str(ns)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _owner_alive(group: str) -> bool:
    try:
        pid_text, start = (OWNER_DIR / group).read_text().split()
        return _proc_start_time(int(pid_text)) == start
    except (OSError, ValueError):
        return False


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def ns_call(ns: Host | str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a fresh thread that has joined namespace ``ns`` and return its result.

    Sockets created inside keep belonging to that namespace, so this is how the test process
    itself talks from inside a namespace (see :func:`ns_socket`).  ``ns=None``: just ``fn()``.
    """
    name = _ns_name(ns)
    if name is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # noqa: B036 - handed to the calling thread
            error.append(e)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def ns_socket(
    ns: Host | str | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A socket created inside namespace ``ns`` (usable from any thread, e.g. with asyncio)."""
    return ns_call(ns, lambda: socket.socket(family, type, proto))


def _family(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def ns_connect(ns: Host | str | None, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection from inside ``ns`` to an IP literal; raises ``OSError`` on failure."""
    sock = ns_socket(ns, _family(host))
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def ns_listen(ns: Host | str | None, host: str, port: int = 0, backlog: int = 64) -> socket.socket:
    """A listening TCP socket bound inside ``ns`` (IPv6 sockets are V6ONLY)."""
    family = _family(host)
    sock = ns_socket(ns, family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def wait_port(ns: Host | str | None, host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connect from ``ns`` to ``host:port`` succeeds."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{host}:{port} not reachable from {_ns_name(ns)}: {last}")
        try:
            ns_connect(ns, host, port, min(1.0, remaining)).close()
            return
        except OSError as e:
            last = e
            time.sleep(0.05)


def sysctl(ns: Host | str | None, key: str, value: str | int) -> None:
    """Set ``net.x.y`` style ``key`` inside ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(value))

    ns_call(ns, write)


def _exec_argv(ns: Host | str | None, argv: Sequence[str]) -> list[str]:
    name = _ns_name(ns)
    return ["ip", "netns", "exec", name, *argv] if name else list(argv)


def run(ns: Host | str | None, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` inside ``ns`` (via ``ip netns exec``; ``ns=None``: here).

    Defaults: ``capture_output=True, text=True, timeout=60``; no ``check``.
    """
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(_exec_argv(ns, argv), **kw)


def popen(ns: Host | str | None, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` inside ``ns``; the process is killed (and reaped) when its
    topology closes or at interpreter exit.  ``ip netns exec`` execs, so ``.pid`` is the
    program's own pid."""
    _install_handlers()
    proc: subprocess.Popen[Any] = subprocess.Popen(_exec_argv(ns, argv), **kw)
    with _lock:
        _popens.append((_ns_name(ns), proc))
    return proc


def stop_process(proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reap it and close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _stop_tracked(names: set[str | None] | None, timeout: float = 3.0) -> None:
    """Stop tracked popen()s in namespaces ``names`` (all when None), all at once."""
    with _lock:
        chosen = [(n, p) for n, p in _popens if names is None or n in names]
        for item in chosen:
            _popens.remove(item)
    for _, proc in chosen:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + timeout
    for _, proc in chosen:
        stop_process(proc, max(0.05, deadline - time.monotonic()))


def _kill_ns_pids(name: str) -> None:
    proc = _ip("netns", "pids", name, check=False)
    for word in proc.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _remove_ns(name: str) -> list[str]:
    """Kill what runs in ``name``, delete it and its /etc/netns dir; returns error strings."""
    errors: list[str] = []
    if (NETNS_RUN_DIR / name).exists():
        _kill_ns_pids(name)
        proc = _ip("netns", "del", name, check=False)
        if proc.returncode != 0 and (NETNS_RUN_DIR / name).exists():
            errors.append(f"ip netns del {name}: {proc.stderr.strip()}")
    etc = ETC_NETNS_DIR / name
    if etc.exists():
        shutil.rmtree(etc, ignore_errors=True)
        if etc.exists():
            errors.append(f"could not remove {etc}")
    return errors


def _remove_group(group: str) -> list[str]:
    errors: list[str] = []
    names = set(list_netns())
    with contextlib.suppress(FileNotFoundError):
        names |= set(os.listdir(ETC_NETNS_DIR))
    for name in sorted(names):
        if name.startswith(group + "-"):
            errors += _remove_ns(name)
    with contextlib.suppress(FileNotFoundError):
        (OWNER_DIR / group).unlink()
    return errors


def cleanup_stale() -> list[str]:
    """Remove every ``kt*`` group whose owning process is gone; returns the groups removed."""
    groups: set[str] = set()
    candidates = list_netns()
    for d in (ETC_NETNS_DIR, OWNER_DIR):
        with contextlib.suppress(FileNotFoundError):
            candidates += os.listdir(d)
    for name in candidates:
        if m := _GROUP_RE.match(name):
            groups.add(m.group(1))
    removed = []
    for group in sorted(groups):
        if not _owner_alive(group):
            _remove_group(group)
            removed.append(group)
    return removed


def _claim_group() -> str:
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    me = f"{pid} {_proc_start_time(pid)}\n"
    for serial in itertools.count():
        group = f"kt{pid % 10000}-{serial}"
        # Write to a private file and hard-link it into place: the claim and its content
        # appear atomically, so a concurrent cleanup_stale() never sees an empty owner file.
        tmp = OWNER_DIR / f".{group}.{pid}.tmp"
        tmp.write_text(me)
        try:
            os.link(tmp, OWNER_DIR / group)
        except FileExistsError:
            continue
        finally:
            tmp.unlink()
        _remove_group_namespaces_only(group)  # orphans without an owner file
        return group
    raise AssertionError("unreachable")


def _remove_group_namespaces_only(group: str) -> None:
    for name in list_netns():
        if name.startswith(group + "-"):
            _remove_ns(name)


def _cleanup_all() -> None:
    with _lock:
        topologies = list(_live)
    for topo in topologies:
        with contextlib.suppress(Exception):
            topo.close()
    _stop_tracked(None, timeout=2.0)


def _install_handlers() -> None:
    global _handlers_installed
    with _lock:
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        _cleanup_all()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


@functools.cache
def netns_available() -> str | None:
    """None when namespaces, veth and bridges work here; else a reason for ``pytest.skip``."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    try:
        with Topology() as topo:
            a = topo.add_host("probe-a")
            b = topo.add_host("probe-b")
            topo.add_bridge(a, "br0", ["2001:db8:ff::1/64"])
            topo.link(a, b, a_bridge="br0", b_addrs=["2001:db8:ff::2/64"])
            sysctl(a, "net.ipv6.conf.all.forwarding", 0)
    except Exception as e:
        return f"ip netns does not work: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Hosts and topologies


class Host:
    """One network namespace of a :class:`Topology`.  ``str(host)`` is the namespace name, so
    a Host can be passed wherever a namespace name is expected."""

    def __init__(self, topology: Topology, name: str, ns: str, ipv4: bool, ipv6: bool) -> None:
        self.topology = topology
        self.name = name
        self.ns = ns
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.addrs: list[str] = []  # CIDR strings, in the order added
        self.ifnames: list[str] = ["lo"]

    def __str__(self) -> str:
        return self.ns

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, addrs={self.addrs!r})"

    @property
    def v4(self) -> str | None:
        """The first IPv4 address added (without prefix length)."""
        return next((a.split("/")[0] for a in self.addrs if ":" not in a), None)

    @property
    def v6(self) -> str | None:
        """The first IPv6 address added (without prefix length)."""
        return next((a.split("/")[0] for a in self.addrs if ":" in a), None)

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return run(self, argv, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return popen(self, argv, **kw)

    def call(self, fn: Callable[[], T]) -> T:
        return ns_call(self, fn)

    def new_socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        return ns_socket(self, family, type)

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        return ns_connect(self, host, port, timeout)

    def listen(self, host: str, port: int = 0) -> socket.socket:
        return ns_listen(self, host, port)

    def wait_port(self, host: str, port: int, timeout: float = 10.0) -> None:
        wait_port(self, host, port, timeout)

    def hosts(self, mapping: Mapping[str, Sequence[str] | str]) -> Path:
        return hosts(self, mapping)

    def sysctl(self, key: str, value: str | int) -> None:
        sysctl(self, key, value)


_BASE_HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"


def hosts(ns: Host | str, mapping: Mapping[str, Sequence[str] | str]) -> Path:
    """Write ``/etc/netns/<ns>/hosts`` (seen as /etc/hosts by processes started with
    ``ip netns exec``, i.e. :func:`run`/:func:`popen`): localhost plus ``{name: [addr, ...]}``.
    Replaces earlier entries.  A name listed with several addresses resolves to all of them
    (getaddrinfo), in the order given before RFC 6724 sorting."""
    name = _ns_name(ns)
    assert name is not None
    lines = [_BASE_HOSTS]
    for hostname, addrs in mapping.items():
        for addr in [addrs] if isinstance(addrs, str) else addrs:
            lines.append(f"{ipaddress.ip_address(addr)} {hostname}\n")
    path = ETC_NETNS_DIR / name / "hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


class Topology:
    """A set of namespaces built with :meth:`add_host`, :meth:`add_bridge`, :meth:`link`,
    :meth:`addr` and :meth:`route`; a context manager that removes everything on exit."""

    def __init__(self) -> None:
        _install_handlers()
        cleanup_stale()
        self.group = _claim_group()
        self.hosts: dict[str, Host] = {}
        self.closed = False
        with _lock:
            _live.append(self)

    # -- context management ----------------------------------------------------------------

    def __enter__(self) -> Any:  # Any: subclasses return themselves
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc_type is None)

    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts.values()]

    def close(self, raise_errors: bool = True) -> None:
        """Kill processes in the namespaces, then delete namespaces and /etc/netns dirs."""
        with _lock:
            if self.closed:
                return
            self.closed = True
            if self in _live:
                _live.remove(self)
        _stop_tracked(set(self.namespaces()))
        errors = _remove_group(self.group)
        if errors and raise_errors:
            raise NetnsError("; ".join(errors))

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- building ----------------------------------------------------------------------------

    def add_host(
        self, name: str, *, ipv4: bool = True, ipv6: bool = True, forwarding: bool = False
    ) -> Host:
        """A new namespace with ``lo`` up, no DAD, no RAs, forwarding as given.  ``ipv6=False``
        disables IPv6 on every interface created later (``lo`` keeps ``::1``); ``ipv4`` is
        only recorded (an IPv6-only host simply gets no IPv4 addresses)."""
        if self.closed:
            raise NetnsError("topology is closed")
        if not _HOST_RE.match(name) or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}")
        ns = f"{self.group}-{name}"
        host = Host(self, name, ns, ipv4, ipv6)
        etc = ETC_NETNS_DIR / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(_BASE_HOSTS)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        if Path("/etc/nsswitch.conf").exists():
            (etc / "nsswitch.conf").write_text(_nsswitch())
        self.hosts[name] = host
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")

        def configure() -> None:
            settings = {
                "net/ipv6/conf/all/accept_dad": 0,
                "net/ipv6/conf/default/accept_dad": 0,
                "net/ipv6/conf/all/accept_ra": 0,
                "net/ipv6/conf/default/accept_ra": 0,
                "net/ipv4/ip_forward": int(forwarding),
                "net/ipv6/conf/all/forwarding": int(forwarding),
            }
            if not ipv6:
                settings["net/ipv6/conf/default/disable_ipv6"] = 1
            for key, value in settings.items():
                with open("/proc/sys/" + key, "w") as f:
                    f.write(str(value))

        ns_call(ns, configure)
        return host

    def _host(self, host: Host | str) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def _ifname(self, host: Host, wanted: str | None) -> str:
        if wanted is None:
            wanted = next(f"eth{i}" for i in itertools.count() if f"eth{i}" not in host.ifnames)
        if len(wanted) > 15 or wanted in host.ifnames:
            raise ValueError(f"interface name {wanted!r} too long or taken in {host.name}")
        host.ifnames.append(wanted)
        return wanted

    def add_bridge(self, host: Host | str, name: str = "br0", addrs: Iterable[str] = ()) -> str:
        """A bridge (no STP, no forward delay, no multicast snooping) inside ``host``."""
        h = self._host(host)
        br = self._ifname(h, name)
        _ip(
            "-n",
            h.ns,
            "link",
            "add",
            br,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        )
        _ip("-n", h.ns, "link", "set", br, "up")
        for cidr in addrs:
            self.addr(h, br, cidr)
        return br

    def link(
        self,
        a: Host | str,
        b: Host | str,
        a_addrs: Iterable[str] = (),
        b_addrs: Iterable[str] = (),
        *,
        a_ifname: str | None = None,
        b_ifname: str | None = None,
        a_bridge: str | None = None,
        b_bridge: str | None = None,
    ) -> tuple[str, str]:
        """A veth pair between ``a`` and ``b`` (optionally enslaved to a bridge on either side),
        both ends up, addresses added.  Returns the two interface names."""
        ha, hb = self._host(a), self._host(b)
        ia, ib = self._ifname(ha, a_ifname), self._ifname(hb, b_ifname)
        _ip("-n", ha.ns, "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", hb.ns)
        for h, ifname, bridge in ((ha, ia, a_bridge), (hb, ib, b_bridge)):
            if bridge is not None:
                _ip("-n", h.ns, "link", "set", ifname, "master", bridge)
            _ip("-n", h.ns, "link", "set", ifname, "up")
        for cidr in a_addrs:
            self.addr(ha, ia, cidr)
        for cidr in b_addrs:
            self.addr(hb, ib, cidr)
        return ia, ib

    def addr(self, host: Host | str, ifname: str, cidr: str) -> None:
        """Add ``cidr`` (IPv6 with ``nodad``) to ``ifname`` in ``host``."""
        h = self._host(host)
        net = ipaddress.ip_interface(cidr)
        if net.version == 6:
            _ip("-n", h.ns, "-6", "addr", "add", cidr, "dev", ifname, "nodad")
        else:
            _ip("-n", h.ns, "addr", "add", cidr, "dev", ifname)
        h.addrs.append(cidr)

    def route(
        self,
        host: Host | str,
        dst: str,
        via: str | None = None,
        *,
        dev: str | None = None,
        kind: str | None = None,
        family: int | None = None,
    ) -> None:
        """``ip route add [kind] dst [via via] [dev dev]`` in ``host``; ``dst`` may be
        ``default`` (the IP version, 4 or 6, then comes from ``via`` or ``family``).  ``kind``
        is e.g. ``blackhole`` (silently drop), ``unreachable`` or ``prohibit``."""
        h = self._host(host)
        if family is None:
            probe = via if dst == "default" else dst
            if probe is None:
                raise ValueError("need via= or family= for a default route without gateway")
            family = ipaddress.ip_network(probe, strict=False).version
        args = ["-n", h.ns, f"-{family}", "route", "add"]
        if kind:
            args.append(kind)
        args.append(dst)
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        _ip(*args)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until every interface is up (bridge ports forwarding) and no address is
        tentative."""
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            while True:
                problem = _not_ready(host.ns)
                if problem is None:
                    break
                if time.monotonic() > deadline:
                    raise NetnsError(f"{host.ns} not ready: {problem}")
                time.sleep(0.02)

    # -- ready-made topologies -----------------------------------------------------------------

    @classmethod
    def standard(cls) -> StandardTopology:
        """IPv4-only client -> dual-stack proxy -> IPv6/IPv4/dual origins (see
        :class:`StandardTopology`)."""
        topo = StandardTopology()
        try:
            topo.build()
        except BaseException:
            topo.close(raise_errors=False)
            raise
        return topo

    @classmethod
    def reverse(cls) -> ReverseTopology:
        """IPv6-only client -> proxy -> two IPv4-only backends (see :class:`ReverseTopology`)."""
        topo = ReverseTopology()
        try:
            topo.build()
        except BaseException:
            topo.close(raise_errors=False)
            raise
        return topo


def _nsswitch() -> str:
    """The machine's nsswitch.conf with ``hosts: files dns`` (no mdns or other lookups)."""
    out = []
    for line in Path("/etc/nsswitch.conf").read_text().splitlines():
        out.append("hosts:          files dns" if line.startswith("hosts:") else line)
    return "\n".join(out) + "\n"


def _not_ready(ns: str) -> str | None:
    links = json.loads(_ip("-n", ns, "-j", "-d", "addr", "show").stdout or "[]")
    for link in links:
        name = link.get("ifname")
        if name == "lo":
            continue
        if link.get("operstate") not in ("UP", "UNKNOWN"):
            return f"{name} is {link.get('operstate')}"
        slave = link.get("linkinfo", {}).get("info_slave_data", {})
        if (
            link.get("linkinfo", {}).get("info_slave_kind") == "bridge"
            and slave.get("state", "forwarding") != "forwarding"
        ):
            return f"{name} bridge port is {slave.get('state')}"
        for a in link.get("addr_info", []):
            if a.get("tentative") or a.get("dadfailed"):
                return f"{a.get('local')} on {name} is tentative"
    return None


class StandardTopology(Topology):
    """IPv4-only ``client`` -- ``proxy`` (forwarding off) -- bridge ``br0`` with the origins.

    ``client`` 198.51.100.2/24 (default via 198.51.100.1, IPv6 disabled except ``::1``);
    ``proxy`` 198.51.100.1/24 on ``client0``, 203.0.113.1/24 and 2001:db8:1::1/64 on ``br0``;
    ``v6origin`` 2001:db8:1::6/64 (no IPv4 but 127.0.0.1); ``v4origin`` 203.0.113.4/24;
    ``dualorigin`` 203.0.113.5/24 + 2001:db8:1::5/64; ``blackhole`` a router on the bridge
    (203.0.113.7, 2001:db8:1::7, forwarding on) that silently drops what the proxy routes to
    it: 2001:db8:1::99, 2001:db8:99::/64 and 203.0.113.99 -- connects there hang (no RST, no
    ICMP), as Happy Eyeballs tests need.
    """

    client_ip = "198.51.100.2"
    proxy_client_ip = "198.51.100.1"
    proxy_v4 = "203.0.113.1"
    proxy_v6 = "2001:db8:1::1"
    v6origin_ip = "2001:db8:1::6"
    v4origin_ip = "203.0.113.4"
    dual_v4 = "203.0.113.5"
    dual_v6 = "2001:db8:1::5"
    blackhole_router_v4 = "203.0.113.7"
    blackhole_router_v6 = "2001:db8:1::7"
    #: IPv6 address that is routed (via the blackhole router) but never answers.
    blackhole_ip = "2001:db8:1::99"
    #: The same for a whole other prefix 2001:db8:99::/64.
    blackhole_net_ip = "2001:db8:99::1"
    #: And an IPv4 address that never answers.
    blackhole_v4 = "203.0.113.99"

    client: Host
    proxy: Host
    v6origin: Host
    v4origin: Host
    dualorigin: Host
    blackhole: Host

    def build(self) -> None:
        self.client = self.add_host("client", ipv6=False)
        self.proxy = self.add_host("proxy")
        self.v6origin = self.add_host("v6origin", ipv4=False)
        self.v4origin = self.add_host("v4origin", ipv6=False)
        self.dualorigin = self.add_host("dualorigin")
        self.blackhole = self.add_host("blackhole", forwarding=True)
        br = self.add_bridge(self.proxy, "br0", [f"{self.proxy_v4}/24", f"{self.proxy_v6}/64"])
        self.link(
            self.client,
            self.proxy,
            [f"{self.client_ip}/24"],
            [f"{self.proxy_client_ip}/24"],
            b_ifname="client0",
        )
        for host, addrs in (
            (self.v6origin, [f"{self.v6origin_ip}/64"]),
            (self.v4origin, [f"{self.v4origin_ip}/24"]),
            (self.dualorigin, [f"{self.dual_v4}/24", f"{self.dual_v6}/64"]),
            (self.blackhole, [f"{self.blackhole_router_v4}/24", f"{self.blackhole_router_v6}/64"]),
        ):
            self.link(host, self.proxy, addrs, b_ifname=f"p-{host.name}"[:15], b_bridge=br)
        self.route(self.client, "default", self.proxy_client_ip)
        self.route(self.v6origin, "default", self.proxy_v6)
        self.route(self.v4origin, "default", self.proxy_v4)
        self.route(self.dualorigin, "default", self.proxy_v4)
        self.route(self.dualorigin, "default", self.proxy_v6)
        for dst in (f"{self.blackhole_ip}/128", "2001:db8:99::/64", f"{self.blackhole_v4}/32"):
            self.route(self.blackhole, dst, kind="blackhole")
            via = self.blackhole_router_v4 if "." in dst else self.blackhole_router_v6
            self.route(self.proxy, dst, via)
        self.wait_ready()


class ReverseTopology(Topology):
    """IPv6-only ``v6client`` -- ``proxy`` -- bridge ``br0`` with IPv4-only backends.

    ``v6client`` 2001:db8:2::2/64 (default via 2001:db8:2::1); ``proxy`` 2001:db8:2::1/64 on
    ``client0`` and 203.0.113.1/24 on ``br0``; ``v4backend`` 203.0.113.4/24 and
    ``v4backend2`` 203.0.113.8/24 (IPv6 disabled except ``::1``, default via 203.0.113.1).
    """

    v6client_ip = "2001:db8:2::2"
    proxy_client_ip = "2001:db8:2::1"
    proxy_v4 = "203.0.113.1"
    v4backend_ip = "203.0.113.4"
    v4backend2_ip = "203.0.113.8"

    v6client: Host
    proxy: Host
    v4backend: Host
    v4backend2: Host

    def build(self) -> None:
        self.v6client = self.add_host("v6client", ipv4=False)
        self.proxy = self.add_host("proxy")
        self.v4backend = self.add_host("v4backend", ipv6=False)
        self.v4backend2 = self.add_host("v4backend2", ipv6=False)
        br = self.add_bridge(self.proxy, "br0", [f"{self.proxy_v4}/24"])
        self.link(
            self.v6client,
            self.proxy,
            [f"{self.v6client_ip}/64"],
            [f"{self.proxy_client_ip}/64"],
            b_ifname="client0",
        )
        for host, ip in (
            (self.v4backend, self.v4backend_ip),
            (self.v4backend2, self.v4backend2_ip),
        ):
            self.link(host, self.proxy, [f"{ip}/24"], b_ifname=f"p-{host.name}"[:15], b_bridge=br)
            self.route(host, "default", self.proxy_v4)
        self.route(self.v6client, "default", self.proxy_client_ip)
        self.wait_ready()
