"""``kushi check URL...``: does this site work over IPv6?

For each URL the report gives the A and AAAA records (from the system resolver, asked once
per family, so ``/etc/hosts`` counts) and then walks one *leg* per family:

* the TCP connect time, through ``connector.Connector`` with an ``ipv6-only`` or
  ``ipv4-only`` ``EgressPolicy`` (``order_addresses`` picks and orders the addresses; the
  family logic lives there and nowhere else; a NAT64-synthesised AAAA is not IPv6);
* for https, the TLS handshake time and whether the certificate is valid for the name
  (``ssl.create_default_context()``, plus ``--ca-file``);
* the HTTP status and the time to the first byte of the response to
  ``GET`` with ``User-Agent: kushi-check`` and ``Connection: close``;
* where redirects lead: up to 5 ``Location`` redirects are followed on the same family; a
  redirect to a host with no address of that family fails the leg, naming the host.

A leg passes when it ends in a final response with a status below 400.

``--page`` also fetches the page over IPv6 (up to 2 MiB) and checks every host it loads
resources from (``<script src>``, ``<link rel=stylesheet href>``, ``<img src|srcset>``,
``<source src|srcset>``, ``<iframe src>``): each needs an AAAA record and must accept a TCP
connection (and for https a TLS handshake) over IPv6.

``--via http://HOST:PORT`` runs the IPv6 leg through a kushi forward proxy, for a user whose
own network is IPv4 only: http URLs are requested in absolute form, https ones through
CONNECT and then TLS end to end. The proxy's ``Proxy-Status`` (RFC 9209) names the address
it connected to (``next-hop="[2001:db8::1]:443"``); the leg passes only if that is an IPv6
address. The IPv4 leg is then done directly (``--no-ipv4`` skips it); the report says which.

Exit status: 0 when every URL (and with ``--page`` every resource host) works over IPv6,
1 when something does not, 2 for bad arguments. Only the IPv6 results decide it: the IPv4
leg is there for comparison.

``--json`` prints one object (schema ``kushi-check/1``)::

    {"schema": "kushi-check/1", "ok": true, "results": [
      {"url": "https://example.test/", "host": "example.test", "port": 443,
       "a": ["192.0.2.1"], "aaaa": ["2001:db8::1"], "dns_error": null,
       "ipv6": LEG, "ipv4": LEG, "page": PAGE or null, "ok": true}]}

    LEG = {"ok": bool, "path": "direct" | "via" | "skipped", "via": "http://..." or null,
           "address": "[2001:db8::1]:443" (connected to; via a proxy: its next hop) or null,
           "connect_ms": float or null (via a proxy: the connect to the proxy),
           "tls_ms": float or null, "tls_valid": bool or null (null for http),
           "status": int or null, "ttfb_ms": float or null,
           "redirects": [{"url": ..., "status": 301, "location": ..., "address": ...}],
           "error": str or null (why it failed; for "skipped", why it was skipped)}

    PAGE = {"ok": bool, "url": final page URL or null, "truncated": bool,
            "hosts": [{"host": ..., "scheme": "https", "port": 443, "aaaa": [...],
                       "ok": bool, "address": ... or null, "connect_ms": ..., "error": ...}],
            "error": str or null, "note": str or null}

The numbers of a leg describe its last request (the page it landed on, or the request
that failed); ``redirects`` lists the requests before it. A URL is ``ok`` when its IPv6 leg
is, and with ``--page`` its page too; the top-level ``ok`` when every URL is. Times are
milliseconds with one decimal. ``page`` is null without ``--page``; its ``error`` names the
hosts that fail, and ``note`` says when there was nothing to check (not HTML, no resources).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Literal, TextIO
from urllib.parse import quote, urljoin, urlsplit

from kushi import http1
from kushi.connector import Connector, EgressPolicy, classify, order_addresses
from kushi.errors import KushiError, UpstreamError
from kushi.netio import Conn
from kushi.resolver import IPAddress, Resolver, ip_literal, unmap

SCHEMA = "kushi-check/1"
USER_AGENT = b"kushi-check"
MAX_REDIRECTS = 5
PAGE_CAP = 2 * 1024 * 1024
MAX_LINE = 8192
MAX_HEAD = 65536
HOST_CONCURRENCY = 8
URL_CONCURRENCY = 4
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"),)

Family = Literal["ipv6", "ipv4"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument: one line, exit code 2."""


class HopFailed(Exception):
    """One request could not be completed; the message says why, naming the host."""


# --- URLs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Url:
    scheme: Literal["http", "https"]
    host: str  # lower case, IPv6 without brackets
    port: int
    target: str  # origin-form: path and query

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def text(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


def parse_url(text: str, *, bare: str | None = None) -> Url:
    """An http or https URL; ``bare`` is the scheme assumed when none is given.

    Raises ``ValueError`` with a one-line reason."""
    raw = text.strip()
    if bare is not None and "://" not in raw:
        raw = f"{bare}://{raw}"
    try:
        parts = urlsplit(raw)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: only http and https URLs can be checked")
    if "@" in parts.netloc:
        raise ValueError(f"{text!r}: user information in URLs is not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r}: invalid port") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"{text!r}: no host")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{text!r}: invalid host name") from None
    check = f"[{host}]" if ":" in host else host
    if not http1.valid_authority(check.encode("ascii")):
        raise ValueError(f"{text!r}: invalid host {host!r}")
    if port == 0:
        raise ValueError(f"{text!r}: port 0")
    target = parts.path or "/"
    if not target.startswith("/"):
        target = "/" + target
    if parts.query:
        target += "?" + parts.query
    if any(c <= " " or c == "\x7f" for c in target):
        raise ValueError(f"{text!r}: spaces or control characters in the path")
    # Non-ASCII characters are percent-encoded (UTF-8); everything else is kept as given.
    target = quote(target, safe="/?#[]@!$&'()*+,;=:%~-._")
    default = 443 if scheme == "https" else 80
    return Url(scheme, host, port or default, target)  # type: ignore[arg-type]


def parse_via(text: str) -> Url:
    try:
        url = parse_url(text, bare="http")
    except ValueError as exc:
        raise UsageError(f"--via {exc}") from None
    if url.scheme != "http" or url.target != "/":
        raise UsageError(f"--via {text!r}: expected http://HOST:PORT")
    return url


# --- Proxy-Status (RFC 9209) and HTML, without I/O -------------------------------------


def parse_proxy_status(value: bytes) -> list[dict[str, str]]:
    """The members of a Proxy-Status field: ``[{"": name, "next-hop": ..., ...}, ...]``.

    RFC 9209 section 2: an sf-list of tokens (or strings) with parameters; the first member
    is the intermediary closest to the origin. String values are unescaped; a parameter
    without a value is ``"?1"``."""
    text = value.decode("latin-1")
    members: list[dict[str, str]] = []
    current: dict[str, str] = {}
    state: Literal["name", "key", "value"] = "name"
    buf: list[str] = []
    key = ""

    def end_item() -> None:
        item = "".join(buf).strip(" \t")
        buf.clear()
        if state == "name" and item:
            current[""] = item
        elif state == "key" and item:
            current[item.lower()] = "?1"
        elif state == "value" and key:
            current[key] = item

    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                buf.append(text[i])
                i += 1
        elif c == ";":
            end_item()
            state = "key"
        elif c == "=" and state == "key":
            key = "".join(buf).strip(" \t").lower()
            buf.clear()
            state = "value"
        elif c == ",":
            end_item()
            if current:
                members.append(current)
            current = {}
            state = "name"
        else:
            buf.append(c)
        i += 1
    end_item()
    if current:
        members.append(current)
    return members


def kushi_member(resp: http1.ResponseHead) -> dict[str, str] | None:
    """The Proxy-Status member kushi added: the last one named kushi. kushi appends its
    member after every upstream's (and drops upstream members carrying its name), so an
    origin cannot make an IPv4-only site PASS by sending its own ``kushi; next-hop=...``."""
    values = resp.get_all(b"proxy-status")
    if not values:
        return None
    members = [m for m in parse_proxy_status(b", ".join(values)) if m.get("") == "kushi"]
    return members[-1] if members else None


class ResourceParser(HTMLParser):
    """Collects the URLs a page loads resources from."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): v for k, v in attrs if v is not None}
        if tag == "base" and self.base is None and a.get("href"):
            self.base = a["href"]
        elif tag == "link":
            rels = a.get("rel", "").lower().split()
            if "stylesheet" in rels and a.get("href"):
                self.urls.append(a["href"])
        elif tag in ("script", "img", "iframe", "source") and a.get("src"):
            self.urls.append(a["src"])
        if tag in ("img", "source") and a.get("srcset"):
            for candidate in a["srcset"].split(","):
                words = candidate.split()
                if words:
                    self.urls.append(words[0])


def resource_origins(page: str, page_url: str) -> list[Url]:
    """The distinct (scheme, host, port) a page loads resources from, in page order."""
    parser = ResourceParser()
    parser.feed(page)
    parser.close()
    base = urljoin(page_url, parser.base) if parser.base else page_url
    seen: dict[tuple[str, str, int], Url] = {}
    for ref in parser.urls:
        ref = ref.strip()
        if not ref or ref.startswith(("data:", "javascript:", "blob:", "about:")):
            continue
        try:
            url = parse_url(urljoin(base, ref))
        except ValueError:
            continue
        seen.setdefault((url.scheme, url.host, url.port), Url(url.scheme, url.host, url.port, "/"))
    return list(seen.values())


def _decode_page(body: bytes, content_type: str) -> str:
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"') or charset
    try:
        return body.decode(charset, "replace")
    except LookupError:
        return body.decode("utf-8", "replace")


# --- results ---------------------------------------------------------------------------


@dataclass(slots=True)
class Hop:
    """One request (or, for a resource host, one connection) and what came of it."""

    url: Url
    address: str | None = None
    connect_ms: float | None = None
    tls_ms: float | None = None
    tls_valid: bool | None = None
    status: int | None = None
    ttfb_ms: float | None = None
    location: str | None = None
    content_type: str = ""
    body: bytes | None = None
    truncated: bool = False
    error: str | None = None


@dataclass(slots=True)
class Leg:
    family: Family
    path: Literal["direct", "via", "skipped"]
    via: str | None = None
    ok: bool = False
    last: Hop | None = None
    redirects: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        hop = self.last
        return {
            "ok": self.ok,
            "path": self.path,
            "via": self.via,
            "address": hop.address if hop else None,
            "connect_ms": hop.connect_ms if hop else None,
            "tls_ms": hop.tls_ms if hop else None,
            "tls_valid": hop.tls_valid if hop else None,
            "status": hop.status if hop else None,
            "ttfb_ms": hop.ttfb_ms if hop else None,
            "redirects": self.redirects,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Options:
    urls: tuple[Url, ...]
    timeout: float = 10.0
    page: bool = False
    via: Url | None = None
    ipv4: bool = True
    ca_file: str | None = None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _fam_record(family: Family) -> str:
    return "AAAA" if family == "ipv6" else "A"


# --- progress ------------------------------------------------------------------------


class Progress:
    """A one-line "n/m checks done" on a terminal's stderr; silent otherwise."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.total = 0
        self.done = 0
        self.shown = False

    def add(self, n: int = 1) -> None:
        self.total += n
        self.show()

    def tick(self) -> None:
        self.done += 1
        self.show()

    def show(self) -> None:
        if self.enabled and self.total > 2:
            self.stream.write(f"\r\x1b[Kkushi check: {self.done}/{self.total} checks done")
            self.stream.flush()
            self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --- the I/O shell ---------------------------------------------------------------------


class Checker:
    def __init__(self, opts: Options, progress: Progress) -> None:
        self.opts = opts
        self.progress = progress
        self.timeout = opts.timeout
        self.connector = Connector(Resolver(timeout=opts.timeout))
        self.tls = ssl.create_default_context()
        if opts.ca_file:
            self.tls.load_verify_locations(opts.ca_file)
        self.dns: dict[tuple[str, int], asyncio.Future[list[IPAddress]]] = {}
        self.host_limit = asyncio.Semaphore(HOST_CONCURRENCY)

    def policy(self, family: Family) -> EgressPolicy:
        return EgressPolicy(
            mode="ipv6-only" if family == "ipv6" else "ipv4-only",
            nat64="allow",
            nat64_prefixes=NAT64_PREFIXES,
            connect_timeout=self.timeout,
        )

    # --- DNS ------------------------------------------------------------------------

    async def lookup(self, host: str, family: Family) -> list[IPAddress]:
        """The A or AAAA addresses of ``host`` (empty when there are none).

        Raises ``HopFailed`` for resolver failures other than "no such records"."""
        af = socket.AF_INET6 if family == "ipv6" else socket.AF_INET
        key = (host, af)
        if key not in self.dns:
            self.dns[key] = asyncio.ensure_future(self._lookup(host, af))
        return list(await asyncio.shield(self.dns[key]))

    async def _lookup(self, host: str, af: int) -> list[IPAddress]:
        version = 6 if af == socket.AF_INET6 else 4
        literal = ip_literal(host)
        if literal is not None:
            return [literal] if literal.version == version else []
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(host, None, family=af, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise HopFailed(f"no DNS answer for {host} within {self.timeout:g} s") from None
        except socket.gaierror as exc:
            if exc.errno in _NO_RECORDS:
                return []
            raise HopFailed(f"resolving {host} failed: {exc.strerror}") from None
        except UnicodeError:
            raise HopFailed(f"{host!r} is not a valid host name") from None
        out: dict[IPAddress, None] = {}
        for _fam, _type, _proto, _canon, sockaddr in infos:
            addr = unmap(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
            if addr.version == version:
                out.setdefault(addr, None)
        return list(out)

    # --- one request ----------------------------------------------------------------

    async def hop(self, url: Url, family: Family, *, want_body: bool, request: bool) -> Hop:
        """Connect (directly, or through --via for IPv6), TLS, and one GET unless told not."""
        hop = Hop(url)
        try:
            if self.opts.via is not None and family == "ipv6":
                await self._via_hop(hop, self.opts.via, want_body=want_body, request=request)
            else:
                await self._direct_hop(hop, family, want_body=want_body, request=request)
        except HopFailed as exc:
            hop.error = str(exc)
        except UpstreamError as exc:  # the response broke off or was malformed
            hop.error = f"{url.host}: {exc.details or exc.error_type}"
        except KushiError as exc:  # from the connector: these name the host already
            hop.error = exc.details or exc.error_type
        except TimeoutError:
            hop.error = f"{url.host}: no answer within {self.timeout:g} s"
        except (ConnectionError, OSError) as exc:
            hop.error = f"{url.host}: {exc.strerror or str(exc) or type(exc).__name__}"
        return hop

    async def _direct_hop(
        self, hop: Hop, family: Family, *, want_body: bool, request: bool
    ) -> None:
        url = hop.url
        addrs = await self.lookup(url.host, family)
        if not addrs:
            if ip_literal(url.host) is not None:
                raise HopFailed(f"{url.host} is not an {family.replace('ip', 'IP')} address")
            raise HopFailed(f"{url.host} has no {_fam_record(family)} record")
        if family == "ipv6" and all(classify(a, NAT64_PREFIXES) == "nat64" for a in addrs):
            raise HopFailed(
                f"{url.host} has only NAT64 AAAA records ({addrs[0]}): the site itself is IPv4 only"
            )
        policy = self.policy(family)
        candidates = order_addresses(url.host, addrs, policy)
        candidates = [c for c in candidates if c[1] != "nat64"] or candidates
        upstream = await self.connector.race(url.host, url.port, candidates, policy)
        hop.address = upstream.next_hop
        hop.connect_ms = _ms(upstream.connect_time)
        conn = upstream.conn
        try:
            if url.scheme == "https":
                await self._tls(conn, hop)
            if request:
                await self._exchange(conn, hop, url.target.encode(), want_body=want_body)
        finally:
            await _close(conn)

    async def _via_hop(self, hop: Hop, proxy: Url, *, want_body: bool, request: bool) -> None:
        url = hop.url
        upstream = await self.connector.connect(
            proxy.host, proxy.port, EgressPolicy(connect_timeout=self.timeout)
        )
        hop.connect_ms = _ms(upstream.connect_time)
        conn = upstream.conn
        try:
            if url.scheme == "https":
                authority = (
                    f"[{url.host}]:{url.port}" if ":" in url.host else f"{url.host}:{url.port}"
                )
                head = http1.serialize_request_head(
                    b"CONNECT",
                    authority.encode(),
                    [(b"Host", authority.encode()), (b"User-Agent", USER_AGENT)],
                )
                conn.write(head)
                await conn.drain()
                resp, _ = await self._read_head(conn, b"CONNECT", url)
                self._proxy_hop(hop, resp, proxy)
                if not 200 <= resp.status < 300:
                    hop.status = resp.status
                    raise HopFailed(_proxy_refusal(resp, proxy, url))
                await self._tls(conn, hop)
                if request:
                    await self._exchange(conn, hop, url.target.encode(), want_body=want_body)
            else:
                resp = await self._exchange(
                    conn,
                    hop,
                    url.text.encode(),
                    want_body=want_body,
                    method=b"GET" if request else b"HEAD",
                )
                self._proxy_hop(hop, resp, proxy)
                if _proxy_error(resp) is not None:
                    raise HopFailed(_proxy_refusal(resp, proxy, url))
        finally:
            await _close(conn)
        if hop.address is None:
            raise HopFailed(
                f"the proxy {proxy.authority} did not say where it connected "
                "(no Proxy-Status next-hop): is it kushi?"
            )
        host = hop.address.rpartition(":")[0].strip("[]")
        addr = ip_literal(host)
        fam = classify(addr, NAT64_PREFIXES) if addr is not None else "name"
        if fam != "ipv6":
            what = {"ipv4": "IPv4", "nat64": "NAT64 (the site is IPv4 only)"}.get(fam, fam)
            raise HopFailed(f"the proxy reached {url.host} over {what}: next hop {hop.address}")

    @staticmethod
    def _proxy_hop(hop: Hop, resp: http1.ResponseHead, proxy: Url) -> None:
        member = kushi_member(resp)
        if member is not None and member.get("next-hop"):
            hop.address = member["next-hop"]

    async def _tls(self, conn: Conn, hop: Hop) -> None:
        began = time.perf_counter()
        try:
            await conn.start_tls(
                self.tls, server_hostname=hop.url.host, ssl_handshake_timeout=self.timeout
            )
        except ssl.SSLCertVerificationError as exc:
            hop.tls_valid = False
            raise HopFailed(
                f"{hop.url.host}: certificate not valid: {exc.verify_message or exc.reason}"
            ) from None
        except ssl.SSLError as exc:
            raise HopFailed(f"{hop.url.host}: TLS handshake failed: {exc.reason}") from None
        hop.tls_ms = _ms(time.perf_counter() - began)
        hop.tls_valid = True

    async def _exchange(
        self,
        conn: Conn,
        hop: Hop,
        target: bytes,
        *,
        want_body: bool,
        method: bytes = b"GET",
    ) -> http1.ResponseHead:
        url = hop.url
        head = http1.serialize_request_head(
            method,
            target,
            [
                (b"Host", url.authority.encode()),
                (b"User-Agent", USER_AGENT),
                (b"Accept", b"*/*"),
                (b"Connection", b"close"),
            ],
        )
        began = time.perf_counter()
        conn.write(head)
        await conn.drain()
        resp, first_byte = await self._read_head(conn, method, url)
        hop.ttfb_ms = _ms(first_byte - began)
        hop.status = resp.status
        location = resp.get(b"location")
        hop.location = location.decode("latin-1").strip() if location else None
        ctype = resp.get(b"content-type")
        hop.content_type = ctype.decode("latin-1") if ctype else ""
        is_html = hop.content_type.split(";")[0].strip().lower() in (
            "text/html",
            "application/xhtml+xml",
        )
        if want_body and 200 <= resp.status < 300 and is_html:
            hop.body, hop.truncated = await self._read_body(conn, resp)
        return resp

    async def _read_head(
        self, conn: Conn, method: bytes, url: Url
    ) -> tuple[http1.ResponseHead, float]:
        first: float | None = None
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    end = http1.find_head_end(conn.buf, MAX_LINE, MAX_HEAD, response=True)
                    if end >= 0:
                        head = bytes(conn.buf[:end])
                        del conn.buf[:end]
                        resp = http1.parse_response_head(head, method)
                        if 100 <= resp.status < 200 and resp.status != 101:
                            continue  # interim responses (RFC 9110 section 15.2)
                        assert first is not None
                        return resp, first
                    if not await conn.fill():
                        raise HopFailed(f"{url.host}: connection closed before a response")
                    if first is None:
                        first = time.perf_counter()
        except TimeoutError:
            raise HopFailed(f"{url.host}: no response within {self.timeout:g} s") from None
        except UpstreamError as exc:
            raise HopFailed(f"{url.host}: bad response: {exc.details}") from None

    async def _read_body(self, conn: Conn, resp: http1.ResponseHead) -> tuple[bytes, bool]:
        reader = http1.body_reader(resp.framing, UpstreamError)
        body = bytearray()
        async with asyncio.timeout(self.timeout):
            while len(body) < PAGE_CAP:
                event = reader.read(conn.buf)
                if isinstance(event, http1.EndOfMessage):
                    return bytes(body), False
                if isinstance(event, http1.Data):
                    body += event.data
                    continue
                if not await conn.fill():
                    reader.eof()
                    return bytes(body), False
        return bytes(body[:PAGE_CAP]), True

    # --- a leg, a page, a URL -------------------------------------------------------

    async def leg(self, url: Url, family: Family, *, want_body: bool) -> Leg:
        via = self.opts.via is not None and family == "ipv6"
        leg = Leg(
            family,
            "via" if via else "direct",
            f"http://{self.opts.via.authority}" if via and self.opts.via else None,
        )
        current = url
        try:
            for n in range(MAX_REDIRECTS + 1):
                hop = await self.hop(current, family, want_body=want_body, request=True)
                leg.last = hop
                if hop.error is not None:
                    leg.error = (
                        hop.error if n == 0 else f"redirected to {current.text}: {hop.error}"
                    )
                    return leg
                assert hop.status is not None
                if hop.status in REDIRECT_STATUSES and hop.location:
                    try:
                        nxt = parse_url(urljoin(current.text, hop.location))
                    except ValueError:
                        leg.error = f"redirect to an unusable location {hop.location!r}"
                        return leg
                    if n == MAX_REDIRECTS:
                        leg.error = f"more than {MAX_REDIRECTS} redirects"
                        return leg
                    leg.redirects.append(
                        {
                            "url": current.text,
                            "status": hop.status,
                            "location": nxt.text,
                            "address": hop.address,
                        }
                    )
                    current = nxt
                    continue
                leg.ok = hop.status < 400
                if not leg.ok:
                    leg.error = f"{current.text} answered {hop.status}"
                return leg
        finally:
            self.progress.tick()
        raise AssertionError("unreachable")  # pragma: no cover

    async def resource_host(self, origin: Url) -> dict[str, Any]:
        async with self.host_limit:
            result: dict[str, Any] = {
                "host": origin.host,
                "scheme": origin.scheme,
                "port": origin.port,
                "aaaa": [],
                "ok": False,
                "address": None,
                "connect_ms": None,
                "error": None,
            }
            try:
                try:
                    result["aaaa"] = [str(a) for a in await self.lookup(origin.host, "ipv6")]
                except HopFailed as exc:
                    if self.opts.via is None:  # through a proxy, the proxy resolves
                        result["error"] = str(exc)
                        return result
                if not result["aaaa"] and self.opts.via is None:
                    result["error"] = f"{origin.host} has no AAAA record"
                    return result
                # Through a proxy a plain-http host needs a request to be reached at all.
                hop = await self.hop(
                    origin,
                    "ipv6",
                    want_body=False,
                    request=self.opts.via is not None and origin.scheme == "http",
                )
                result["address"] = hop.address
                result["connect_ms"] = hop.connect_ms
                result["error"] = hop.error
                result["ok"] = hop.error is None
                return result
            finally:
                self.progress.tick()

    async def page(self, leg6: Leg) -> dict[str, Any]:
        hop = leg6.last
        out: dict[str, Any] = {
            "ok": False,
            "url": hop.url.text if hop and leg6.ok else None,
            "truncated": False,
            "hosts": [],
            "error": None,
            "note": None,
        }
        if not leg6.ok or hop is None:
            out["error"] = "the page could not be fetched over IPv6"
            return out
        if hop.body is None:
            out["ok"] = True
            out["note"] = f"not an HTML page ({hop.content_type or 'no Content-Type'})"
            return out
        out["truncated"] = hop.truncated
        origins = resource_origins(_decode_page(hop.body, hop.content_type), hop.url.text)
        self.progress.add(len(origins))
        out["hosts"] = list(await asyncio.gather(*(self.resource_host(o) for o in origins)))
        bad = [h["host"] for h in out["hosts"] if not h["ok"]]
        out["ok"] = not bad
        if bad:
            out["error"] = "resources from hosts that do not work over IPv6: " + ", ".join(
                dict.fromkeys(bad)
            )
        elif not origins:
            out["note"] = "the page loads no scripts, styles, images or frames"
        return out

    async def check_url(self, url: Url) -> dict[str, Any]:
        dns_error = None
        records: dict[Family, list[str]] = {"ipv6": [], "ipv4": []}
        families: tuple[Family, ...] = ("ipv6", "ipv4")
        for family in families:
            try:
                records[family] = [str(a) for a in await self.lookup(url.host, family)]
            except HopFailed as exc:
                dns_error = str(exc)
        if (
            not records["ipv6"]
            and not records["ipv4"]
            and dns_error is None
            and self.opts.via is None
        ):
            dns_error = f"{url.host} does not exist (no A or AAAA record)"
        literal = ip_literal(url.host)
        do_ipv4 = self.opts.ipv4 and (literal is None or literal.version == 4)
        legs = [self.leg(url, "ipv6", want_body=self.opts.page)]
        if do_ipv4:
            legs.append(self.leg(url, "ipv4", want_body=False))
        self.progress.add(len(legs))
        done = await asyncio.gather(*legs)
        leg6 = done[0]
        if do_ipv4:
            leg4 = done[1]
        else:
            why = "--no-ipv4" if not self.opts.ipv4 else f"{url.host} is an IPv6 address"
            leg4 = Leg("ipv4", "skipped", error=why)
        page = await self.page(leg6) if self.opts.page else None
        ok = leg6.ok and (page is None or bool(page["ok"]))
        return {
            "url": url.text,
            "host": url.host,
            "port": url.port,
            "a": records["ipv4"],
            "aaaa": records["ipv6"],
            "dns_error": dns_error,
            "ipv6": leg6.as_json(),
            "ipv4": leg4.as_json(),
            "page": page,
            "ok": ok,
        }

    async def run(self) -> list[dict[str, Any]]:
        limit = asyncio.Semaphore(URL_CONCURRENCY)

        async def one(url: Url) -> dict[str, Any]:
            async with limit:
                return await self.check_url(url)

        try:
            return list(await asyncio.gather(*(one(u) for u in self.opts.urls)))
        finally:
            for future in self.dns.values():
                if future.done() and not future.cancelled():
                    future.exception()


_NO_RECORDS = frozenset(
    {
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
        getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME),
    }
)


def _proxy_error(resp: http1.ResponseHead) -> dict[str, str] | None:
    """kushi's own member when it carries an error (an upstream's error is not kushi's)."""
    member = kushi_member(resp)
    return member if member is not None and "error" in member else None


def _proxy_refusal(resp: http1.ResponseHead, proxy: Url, url: Url) -> str:
    member = _proxy_error(resp)
    where = f"the proxy {proxy.authority} answered {resp.status}"
    if member is None:
        return f"{where} for {url.host}"
    details = member.get("details", "")
    return f"{where}: {member['error']}" + (f": {details}" if details else "")


async def _close(conn: Conn) -> None:
    conn.close()
    try:
        async with asyncio.timeout(1.0):
            await conn.wait_closed()
    except TimeoutError:
        conn.abort()


# --- output --------------------------------------------------------------------------


class Style:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def ok(self, text: str) -> str:
        return self._wrap("32", text)

    def bad(self, text: str) -> str:
        return self._wrap("31;1", text)

    def note(self, text: str) -> str:
        return self._wrap("33", text)

    def bold(self, text: str) -> str:
        return self._wrap("1", text)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


_PAD = " " * 15  # the width of "  IPv6   FAIL  ": continuation lines start here


def _leg_lines(name: str, leg: dict[str, Any], style: Style, via_mode: bool) -> list[str]:
    if leg["path"] == "skipped":
        why = leg["error"] or "not asked for"
        return [f"  {name:<6} {style.note('skip')}  {why}"]
    mark = style.ok("ok  ") if leg["ok"] else style.bad("FAIL")
    how = ""
    facts = []
    if leg["path"] == "via":
        how = f"via {leg['via']}"
        if leg["address"]:
            facts.append(f"next hop {leg['address']}")
    elif via_mode:
        how = "direct"
    if leg["address"] and leg["path"] != "via":
        facts.append(leg["address"])
    if leg["connect_ms"] is not None:
        to_proxy = " (to the proxy)" if leg["path"] == "via" else ""
        facts.append(f"connect {_fmt_ms(leg['connect_ms'])}{to_proxy}")
    if leg["tls_valid"] is not None:
        valid = "certificate valid" if leg["tls_valid"] else "certificate NOT valid"
        facts.append(f"TLS {_fmt_ms(leg['tls_ms'])} ({valid})")
    if leg["status"] is not None:
        facts.append(f"HTTP {leg['status']}")
    if leg["ttfb_ms"] is not None:
        facts.append(f"first byte {_fmt_ms(leg['ttfb_ms'])}")
    words = [w for w in (how, *facts) if w]
    lines = [f"  {name:<6} {mark}  " + "  ".join(words)]
    for r in leg["redirects"]:
        lines.insert(-1, f"  {name:<6} {style.note('->  ')}  {r['status']} to {r['location']}")
    if leg["error"]:
        if facts:
            lines.append(_PAD + style.bad(leg["error"]))
        else:
            lines[-1] += ("  " if words else "") + style.bad(leg["error"])
    return lines


def _host_label(host: dict[str, Any]) -> str:
    """``name``, or ``name:port`` when the port is not the scheme's default."""
    default = 443 if host["scheme"] == "https" else 80
    name = f"[{host['host']}]" if ":" in host["host"] else host["host"]
    return name if host["port"] == default else f"{name}:{host['port']}"


def render_text(results: Sequence[dict[str, Any]], style: Style) -> str:
    """The terminal report; ``style`` adds colour when stdout is a terminal."""
    out: list[str] = []
    for res in results:
        verdict = style.ok("PASS") if res["ok"] else style.bad("FAIL")
        via_mode = res["ipv6"]["path"] == "via"
        out.append(f"{style.bold(res['url'])}  {verdict}")
        out.append(f"  {'DNS':<6} A     {', '.join(res['a']) or style.note('none')}")
        out.append(f"  {'':<6} AAAA  {', '.join(res['aaaa']) or style.note('none')}")
        if res["dns_error"]:
            out.append(_PAD + style.bad(res["dns_error"]))
        out.extend(_leg_lines("IPv6", res["ipv6"], style, via_mode))
        out.extend(_leg_lines("IPv4", res["ipv4"], style, via_mode))
        page = res["page"]
        if page is not None:
            mark = style.ok("ok  ") if page["ok"] else style.bad("FAIL")
            hosts = page["hosts"]
            summary = f"{len(hosts)} resource host{'s' if len(hosts) != 1 else ''}"
            if page["url"]:
                summary += f" on {page['url']}"
            if page["truncated"]:
                summary += " (page cut at 2 MiB)"
            out.append(f"  {'page':<6} {mark}  {summary}")
            names = [_host_label(h) for h in hosts]
            width = max((len(n) for n in names), default=0)
            for h, label in zip(hosts, names, strict=True):
                hmark = style.ok("ok  ") if h["ok"] else style.bad("FAIL")
                if h["error"]:
                    detail = style.bad(h["error"])
                else:
                    detail = f"{h['address']}  connect {_fmt_ms(h['connect_ms'])}"
                out.append(f"{_PAD}{hmark}  {label:<{width}}  {detail}")
            if page["error"]:
                out.append(_PAD + style.bad(page["error"]))
            if page["note"]:
                out.append(_PAD + style.note(page["note"]))
        out.append("")
    failed = [r["url"] for r in results if not r["ok"]]
    n = len(results)
    urls = f"URL{'s' if n != 1 else ''}"
    if not failed:
        out.append(style.ok(f"{n} {urls} checked: all work over IPv6"))
    else:
        out.append(style.bad(f"{len(failed)} of {n} {urls} checked do not work over IPv6"))
    return "\n".join(out) + "\n"


# --- entry point ---------------------------------------------------------------------


def options_from(args: argparse.Namespace) -> Options:
    """Raises ``UsageError`` for anything wrong with the arguments."""
    urls = []
    for text in args.urls:
        try:
            urls.append(parse_url(text, bare="https"))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not args.timeout > 0:
        raise UsageError("--timeout must be more than 0 seconds")
    via = parse_via(args.via) if args.via else None
    if args.ca_file and not os.path.isfile(args.ca_file):
        raise UsageError(f"--ca-file {args.ca_file!r}: no such file")
    return Options(
        urls=tuple(urls),
        timeout=float(args.timeout),
        page=bool(args.page),
        via=via,
        ipv4=not args.no_ipv4,
        ca_file=args.ca_file,
    )


def command(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        opts = options_from(args)
        progress = Progress(err, err.isatty())
        try:
            results = asyncio.run(_run(opts, progress))
        except KeyboardInterrupt:
            progress.finish()
            print("kushi check: interrupted", file=err)
            return EXIT_FAIL
        finally:
            progress.finish()
    except UsageError as exc:
        print(f"kushi check: {exc}", file=err)
        return EXIT_USAGE
    except ssl.SSLError as exc:
        print(f"kushi check: --ca-file: {exc.reason or exc}", file=err)
        return EXIT_USAGE
    ok = all(r["ok"] for r in results)
    if args.json:
        json.dump({"schema": SCHEMA, "ok": ok, "results": results}, out, indent=2)
        out.write("\n")
    else:
        colour = out.isatty() and "NO_COLOR" not in os.environ
        out.write(render_text(results, Style(colour)))
    out.flush()
    return EXIT_OK if ok else EXIT_FAIL


async def _run(opts: Options, progress: Progress) -> list[dict[str, Any]]:
    return await Checker(opts, progress).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", nargs="+", metavar="URL", help="http or https URL (https if bare)")
    p.add_argument("--json", action="store_true", help="print JSON (schema kushi-check/1)")
    p.add_argument(
        "--page",
        action="store_true",
        help="also check every host the page loads scripts, styles, images and frames from",
    )
    p.add_argument(
        "--via",
        metavar="http://HOST:PORT",
        help="do the IPv6 leg through this kushi forward proxy (for IPv4-only networks)",
    )
    p.add_argument("--no-ipv4", action="store_true", help="skip the IPv4 comparison leg")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per step [default: 10]"
    )
    p.add_argument("--ca-file", metavar="FILE", help="also trust this CA (PEM) for https")


__all__ = [
    "Checker",
    "Options",
    "Url",
    "add_arguments",
    "command",
    "parse_proxy_status",
    "parse_url",
    "render_text",
    "resource_origins",
]
