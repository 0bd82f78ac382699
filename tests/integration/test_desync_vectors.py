"""kushi against the HTTP request desync corpus (tests/data/desync-vectors, from
aws/http-desync-guardian, Apache-2.0: LICENSE and NOTICE beside the YAML files): every one
of its cases, in forward and in reverse mode, each over plain TCP and inside TLS (a TLS
listener's requests go through the same parser: the ids of those runs say ``-tls-``).

Each case is built into raw request bytes exactly as the YAML gives them: the request line
``METHOD SP URI SP VERSION``, then the headers in order, byte for byte (a value that begins
with whitespace is written straight after the colon, otherwise after ``": "``; text is
encoded as Latin-1 where it fits, so ``"\\x88"`` is the byte 0x88, and as UTF-8 otherwise).
Two things are added, because without them the cases would test something else:

* a ``Host`` field first (unless the case has one), since an HTTP/1.1 request without one
  is refused whatever its framing (RFC 9112 section 3.2);
* a body that agrees with the framing the case declares: ``5\\r\\nhello\\r\\n0\\r\\n\\r\\n``
  when a ``Transfer-Encoding`` field ends in ``chunked``, else N bytes for one
  ``Content-Length: N`` (N up to 4 MB), else none.

In forward mode the URI is sent in absolute form (``http://[::1]:PORT`` + URI) to a forward
listener; in reverse mode it is sent as is to a reverse listener whose backend is the same
origin. Both listeners belong to one kushi process started once for the module. The origin
(``support.raw_origin``) records every byte it receives per connection, so "nothing reached
upstream" and "what upstream got was normalised" are checked on the bytes themselves.

The rule (tests/data/desync-vectors/README.md):

* Severe: 400, ``Connection: close`` and the connection closed; nothing upstream.
* Ambiguous: refused the same way, or forwarded as a normalised request: one
  ``Content-Length`` or ``Transfer-Encoding: chunked`` (never both), no control bytes in
  any field, the body intact and nothing after it.
* Compliant: forwarded, and the client gets the origin's response.
* Acceptable: either.

For every case the test states which outcome kushi gives, and the outcome is part of the
test id, e.g. ``reverse-acceptable-refused-...`` or ``forward-ambiguous-forwarded-...``:
``FORWARDED`` lists the Acceptable and Ambiguous cases kushi forwards (the rest are refused),
``DEVIATIONS`` the Severe and Compliant cases where kushi departs from the corpus on purpose,
with the reason, ``BY_MODE`` a case whose bytes mean something else in origin form, and
``KNOWN_BUGS`` the cases kushi gets wrong today (strict xfail, so fixing kushi flags them).

Beyond the README, the request upstream may not carry a field that a server mapping ``_`` to
``-`` would read as a second framing field (``Content_Length``, ``Transfer_Encoding``).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.kushi_proc import Kushi, free_port, write_toml
from support.raw_origin import RESPONSE_MARKER, RawOrigin, exchange

VECTORS_DIR = Path(__file__).resolve().parents[1] / "data" / "desync-vectors"
#: The corpus as copied from http-desync-guardian: a clone that lacks a file fails loudly.
CORPUS_SIZE = 158

pytestmark = pytest.mark.timeout(60)

#: Acceptable and Ambiguous cases kushi forwards, keyed by (name, method). Every other
#: Acceptable or Ambiguous case is refused. Each of these is a valid HTTP/1.1 message whose
#: framing kushi can state exactly; kushi re-frames it (one Content-Length or chunked).
FORWARDED: dict[tuple[str, str], str] = {
    ("Get with a body and Content-Length:0", "GET"): "Content-Length: 0 is no body",
    ("Get with a body and Content-Length:0", "HEAD"): "Content-Length: 0 is no body",
    ("Unknown but OK HTTP/1.2", "GET"): "HTTP/1.x with x > 1 is handled as 1.1 (RFC 9110 2.5)",
    ("Get with a body and Content-Length", "GET"): "a GET body is framed by Content-Length",
    ("Get with a body and Transfer-Encoding", "GET"): "a GET body framed by chunked",
    ("Head with a body and Content-Length", "HEAD"): "a HEAD body is framed by Content-Length",
    ("Head with a body and Transfer-Encoding", "HEAD"): "a HEAD body framed by chunked",
    ("Has a CL in GET", "GET"): "a GET body is framed by Content-Length",
    ("Has a TE in GET", "GET"): "a GET body framed by chunked",
    ("Transfer-Encoding with multiple hyphens", "POST"): "Transfer---Encoding: no alias",
    ("Transfer-Encoding with multiple delimiters", "POST"): "Transfer___Encoding: no alias",
}

#: Severe and Compliant cases where kushi departs from the corpus on purpose:
#: (name, method) -> (outcome, reason). Refusals are checked as refusals; a forwarded case
#: is still checked byte for byte for one normalised request upstream.
DEVIATIONS: dict[tuple[str, str], tuple[str, str]] = {}

#: Cases whose outcome depends on the mode: (name, method, mode) -> (outcome, reason).
BY_MODE: dict[tuple[str, str, str], tuple[str, str]] = {
    ("Empty URI", "GET", "reverse"): (
        "refused",
        "in origin form the request line is 'GET  HTTP/1.1', with no request-target at all "
        "(RFC 9112 3); in absolute form it is http://host:port, forwarded as GET /",
    ),
}

#: Where kushi is wrong today: (name, method) -> the bug. These are expected to pass once
#: kushi is fixed (strict xfail until then).
KNOWN_BUGS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Vector:
    source: str
    name: str
    tier: str
    method: str
    uri: str
    version: str
    headers: tuple[tuple[str, str], ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.method)


def load_vectors(directory: Path = VECTORS_DIR) -> list[Vector]:
    """Every case of the corpus; an absent or empty corpus is an error, never a skip."""
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"desync corpus missing: no *.yaml in {directory}")
    vectors = []
    for path in paths:
        for case in yaml.safe_load(path.read_text(encoding="utf-8")) or []:
            headers = tuple((str(h["name"]), str(h["value"])) for h in (case.get("headers") or []))
            vectors.append(
                Vector(
                    source=path.stem,
                    name=str(case["name"]),
                    tier=str(case["expected"]["tier"]),
                    method=str(case["method"]),
                    uri=str(case["uri"]),
                    version=str(case["version"]),
                    headers=headers,
                )
            )
    return vectors


def encode(text: str) -> bytes:
    """Latin-1 where every character fits (so "\\x88" is one byte), UTF-8 otherwise."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def expected_outcome(vector: Vector, mode: str) -> str:
    by_mode = BY_MODE.get((vector.name, vector.method, mode))
    if by_mode is not None:
        return by_mode[0]
    deviation = DEVIATIONS.get(vector.key)
    if deviation is not None:
        return deviation[0]
    if vector.tier == "Severe" or vector.key in KNOWN_BUGS:
        return "refused"
    if vector.tier == "Compliant":
        return "forwarded"
    return "forwarded" if vector.key in FORWARDED else "refused"


def refusal_status(vector: Vector) -> int:
    # A well-formed request line naming HTTP/0.9 is 505; everything else refused is 400.
    return 505 if vector.version == "HTTP/0.9" else 400


def _declared_body(vector: Vector) -> tuple[bytes, bytes]:
    """(bytes to send after the head, the payload those bytes carry)."""
    te = [v for n, v in vector.headers if n.lower() == "transfer-encoding"]
    cl = [v for n, v in vector.headers if n.lower() == "content-length"]
    codings = [c.split(";")[0].strip().lower() for v in te for c in v.split(",")]
    if codings and codings[-1] == "chunked":
        return b"5\r\nhello\r\n0\r\n\r\n", b"hello"
    items = {item.strip() for v in cl for item in v.split(",")}
    if len(items) == 1:
        (item,) = items
        if item.isdigit() and int(item) <= 4_000_000:
            n = int(item)
            payload = bytes(b"0123456789abcdef"[i % 16] for i in range(min(n, 4096)))
            payload = (payload * (n // 4096 + 1))[:n]
            return payload, payload
    return b"", b""


def build_request(vector: Vector, mode: str, authority: str) -> tuple[bytes, bytes, bytes]:
    """(head bytes, body bytes, payload the origin should see) for ``vector`` in ``mode``."""
    uri = encode(vector.uri)
    target = b"http://" + authority.encode() + uri if mode == "forward" else uri
    lines = [encode(vector.method) + b" " + target + b" " + encode(vector.version)]
    if not any(name.lower() == "host" for name, _ in vector.headers):
        lines.append(b"Host: " + authority.encode())
    for name, value in vector.headers:
        sep = b":" if value[:1] in (" ", "\t") else b": "
        lines.append(encode(name) + sep + encode(value))
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    body, payload = _declared_body(vector)
    return head, body, payload


# --- what the origin received must be one normalised request ---------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int]:
    body = bytearray()
    while True:
        eol = data.index(b"\r\n", pos)
        size_text = data[pos:eol]
        assert re.fullmatch(rb"[0-9a-fA-F]+", size_text), f"chunk size line {size_text!r}"
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            # Trailers: none expected from a normalised request.
            assert data[pos : pos + 2] == b"\r\n", f"trailers forwarded: {data[pos:]!r}"
            return bytes(body), pos + 2
        body += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n", "chunk data longer than its size"
        pos += size + 2


def check_normalised(data: bytes, method: bytes, target: bytes, payload: bytes) -> None:
    """``data`` is exactly one request with unambiguous framing carrying ``payload``."""
    head_end = data.find(b"\r\n\r\n")
    assert head_end >= 0, f"no complete head upstream: {data!r}"
    lines = data[:head_end].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, f"bare CR/LF upstream: {line!r}"
    request_line = lines[0].split(b" ")
    assert request_line == [method, target, b"HTTP/1.1"], lines[0]
    cl: list[bytes] = []
    te: list[bytes] = []
    for line in lines[1:]:
        assert line[:1] not in (b" ", b"\t"), f"obs-fold upstream: {line!r}"
        name, sep, value = line.partition(b":")
        assert sep and _TOKEN.fullmatch(name), f"bad field name upstream: {line!r}"
        assert not _CTL.search(value), f"control byte in a field value upstream: {line!r}"
        alias = name.lower().replace(b"_", b"-")
        if alias in (b"content-length", b"transfer-encoding"):
            assert alias == name.lower(), f"framing field look-alike upstream: {line!r}"
        if name.lower() == b"content-length":
            cl.append(value.strip(b" \t"))
        elif name.lower() == b"transfer-encoding":
            te.append(value.strip(b" \t"))
    assert not (cl and te), "both Content-Length and Transfer-Encoding upstream"
    assert len(cl) <= 1, f"several Content-Length fields upstream: {cl}"
    start = head_end + 4
    if te:
        # One field whose last coding is chunked, and chunked nowhere else. Codings applied
        # before it (gzip, ...) travel on unchanged: only the chunked framing is kushi's.
        assert len(te) == 1, f"several Transfer-Encoding fields upstream: {te}"
        codings = [c.strip(b" \t") for c in te[0].split(b",")]
        assert codings[-1] == b"chunked" and b"chunked" not in codings[:-1], te
        assert all(re.fullmatch(rb"[a-z0-9-]+", c) for c in codings), te
        body, end = _dechunk(data, start)
    elif cl:
        assert cl[0].isdigit(), cl
        end = start + int(cl[0])
        body = data[start:end]
    else:
        body, end = b"", start
    assert body == payload, f"body upstream {body[:60]!r}... != sent {payload[:60]!r}..."
    assert end == len(data), f"bytes after the request upstream: {data[end:][:200]!r}"


# --- the kushi under test ----------------------------------------------------------------


@dataclass
class Stack:
    origin: RawOrigin
    kushi: Kushi
    forward: tuple[str, int]
    reverse: tuple[str, int]
    forward_tls: tuple[str, int]
    reverse_tls: tuple[str, int]
    client_tls: ssl.SSLContext

    def address(self, mode: str, tls: bool = False) -> tuple[str, int]:
        if tls:
            return self.forward_tls if mode == "forward" else self.reverse_tls
        return self.forward if mode == "forward" else self.reverse


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tls_ca: Any) -> Iterator[Stack]:
    """The origin on [::1]; one kushi with a forward listener on 127.0.0.1 (allowed to reach
    ::1, which the destination policy refuses by default) and a reverse listener on [::1]
    whose backend is the origin, and the same two again with TLS (the test CA's
    certificate)."""
    workdir = tmp_path_factory.mktemp("desync")
    forward = ("127.0.0.1", free_port("127.0.0.1"))
    reverse = ("::1", free_port("::1"))
    forward_tls = ("127.0.0.1", free_port("127.0.0.1"))
    reverse_tls = ("::1", free_port("::1"))
    tls_files = {"tls_cert": str(tls_ca.cert_chain), "tls_key": str(tls_ca.key)}
    with RawOrigin("::1") as origin:
        config = workdir / "kushi.toml"
        write_toml(
            config,
            {"access_log_format": "json"},
            [
                {
                    "name": "fwd",
                    "mode": "forward",
                    "listen": [f"{forward[0]}:{forward[1]}"],
                    "allow_destinations": ["::1/128"],
                },
                {
                    "name": "rev",
                    "mode": "reverse",
                    "listen": [f"[{reverse[0]}]:{reverse[1]}"],
                    "backend": [f"http://{origin.authority}"],
                },
                {
                    "name": "fwd-tls",
                    "mode": "forward",
                    "listen": [f"{forward_tls[0]}:{forward_tls[1]}"],
                    "allow_destinations": ["::1/128"],
                    **tls_files,
                },
                {
                    "name": "rev-tls",
                    "mode": "reverse",
                    "listen": [f"[{reverse_tls[0]}]:{reverse_tls[1]}"],
                    "backend": [f"http://{origin.authority}"],
                    **tls_files,
                },
            ],
        )
        kushi = Kushi(
            ["serve", "--config", str(config)],
            workdir,
            wait_for=[forward, reverse, forward_tls, reverse_tls],
        )
        client_tls = ssl.create_default_context(cafile=str(tls_ca.ca_pem))
        try:
            yield Stack(origin, kushi, forward, reverse, forward_tls, reverse_tls, client_tls)
        finally:
            kushi.stop()


# --- the cases ---------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:70]


def _ids(vectors: list[Vector]) -> list[str]:
    """Readable, unique slugs: the name, then the method, then a number if still needed."""
    slugs = [_slug(v.name) for v in vectors]
    slugs = [
        s + "-" + _slug(v.method) if slugs.count(s) > 1 else s
        for s, v in zip(slugs, vectors, strict=True)
    ]
    seen: dict[str, int] = {}
    out = []
    for s in slugs:
        if slugs.count(s) > 1:
            seen[s] = seen.get(s, 0) + 1
            s = f"{s}-{seen[s]}"
        out.append(s)
    return out


def _params() -> list[Any]:
    vectors = load_vectors()
    params = []
    for tls in (False, True):
        for mode in ("forward", "reverse"):
            for v, slug in zip(vectors, _ids(vectors), strict=True):
                outcome = expected_outcome(v, mode)
                marks = []
                if v.key in KNOWN_BUGS:
                    marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[v.key]))
                ident = f"{mode}{'-tls' if tls else ''}-{v.tier.lower()}-{outcome}-{slug}"
                params.append(pytest.param(mode, tls, v, outcome, id=ident, marks=marks))
    return params


def test_corpus_is_complete() -> None:
    """The corpus is in the repository, whole, with its licence, and every case has a
    unique test id."""
    vectors = load_vectors()
    assert len(vectors) == CORPUS_SIZE
    assert len({v.key for v in vectors}) == CORPUS_SIZE
    assert {v.tier for v in vectors} == {"Compliant", "Acceptable", "Ambiguous", "Severe"}
    assert "Apache License" in (VECTORS_DIR / "LICENSE").read_text(encoding="utf-8")
    assert (VECTORS_DIR / "NOTICE").is_file()
    ids = _ids(vectors)
    assert len(set(ids)) == len(ids)


def test_outcome_tables_name_real_cases() -> None:
    """Each entry of FORWARDED, DEVIATIONS, KNOWN_BUGS and BY_MODE names a case of the
    corpus in the tier the table is for (a renamed case would silently change outcome)."""
    tiers = {v.key: v.tier for v in load_vectors()}
    expected = [(key, ("Acceptable", "Ambiguous")) for key in FORWARDED]
    expected += [(key, ("Severe", "Compliant")) for key in DEVIATIONS]
    expected += [(key, ("Ambiguous",)) for key in KNOWN_BUGS]
    expected += [((name, method), tuple(set(tiers.values()))) for name, method, _ in BY_MODE]
    wrong = [(key, tiers.get(key)) for key, allowed in expected if tiers.get(key) not in allowed]
    assert wrong == []


@pytest.mark.parametrize("mode, tls, vector, outcome", _params())
def test_vector(stack: Stack, mode: str, tls: bool, vector: Vector, outcome: str) -> None:
    head, body, payload = build_request(vector, mode, stack.origin.authority)
    mark = stack.origin.count()
    resp = exchange(
        stack.address(mode, tls),
        head,
        body,
        head_request=vector.method == "HEAD",
        expect_close=outcome == "refused",
        tls=stack.client_tls if tls else None,
    )
    arrived = stack.origin.since(mark)
    if outcome == "refused":
        assert resp.status == refusal_status(vector), (resp.raw[:300], stack.kushi.stderr[-2000:])
        assert resp.proxy_status.startswith("kushi; error=http_request_error; details="), resp.raw
        assert resp.get(RESPONSE_MARKER) is None
        assert resp.get(b"connection") == b"close"
        assert resp.closed, "kushi kept the connection open after refusing the request"
        assert arrived == [], f"refused, yet upstream received {[c.snapshot() for c in arrived]}"
        return
    assert resp.status == 200, (resp.raw[:500], [c.snapshot()[:300] for c in arrived])
    assert resp.get(RESPONSE_MARKER) is not None, "the response did not come from the origin"
    assert resp.proxy_status.startswith("kushi; next-hop="), resp.proxy_status
    assert "error=" not in resp.proxy_status
    assert len(arrived) == 1, f"{len(arrived)} upstream connections for one request"
    stack.origin.wait_closed(arrived)
    if mode == "forward":
        target = encode(vector.uri) or b"/"
    else:
        target = encode(vector.uri)
    check_normalised(arrived[0].snapshot(), encode(vector.method), target, payload)
