"""The status page and the PAC file in a real browser (headless Chromium).

* The status page, loaded after real traffic through kushi, must draw the requests: the
  chart's columns and legend count each family, the recent-requests table lists every
  request with its family, and the errors list names the error type. The DOM is read after
  the page's own scripts have fetched ``/api/status`` (``--dump-dom`` with a virtual time
  budget). Screenshots at desktop and phone size go to ``test-artifacts/``.
* The PAC file: in network namespaces, an IPv4-only "client" (IPv6 disabled) runs Chromium
  with ``--proxy-pac-url`` pointing at kushi's admin listener; it loads a page from a name
  that only kushi can resolve, to an origin that has only an IPv6 address. The page arrives,
  and the origin's log shows it came from kushi over IPv6.

Every test skips, saying why, when Chromium is missing (``make test`` installs it).
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.chromium import chromium, needs_chromium
from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import ONE_K, spawn_origin

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
pytestmark = [pytest.mark.timeout(90), needs_chromium]

OriginFactory = Callable[..., Any]


# --- reading the DOM Chromium dumped --------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parts: list[str] = field(default_factory=list)
    children: list[Element] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def find_all(self, tag: str, **attrs: str) -> list[Element]:
        out = []
        for child in self.children:
            if child.tag == tag and all(child.attrs.get(k) == v for k, v in attrs.items()):
                out.append(child)
            out.extend(child.find_all(tag, **attrs))
        return out

    def by_id(self, ident: str) -> Element:
        if self.attrs.get("id") == ident:
            return self
        for child in self.children:
            try:
                return child.by_id(ident)
            except KeyError:
                pass
        raise KeyError(ident)


VOID = {"meta", "link", "br", "img", "input", "hr", "source", "wbr", "area", "base", "col"}


class DomParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        for element in self.stack[1:]:
            element.parts.append(data)


def parse_dom(html: str) -> Element:
    parser = DomParser()
    parser.feed(html)
    parser.close()
    return parser.root


# --- kushi with traffic -----------------------------------------------------------------------


def start_kushi(argv: list[str], workdir: Path, wait: list[tuple[str, int]], **kw: Any) -> Kushi:
    with warnings.catch_warnings():  # Kushi hands open()-ed files to Popen
        warnings.simplefilter("ignore", ResourceWarning)
        return Kushi(argv, workdir, wait_for=wait, **kw)


def curl_status(proxy_port: int, url: str) -> int:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20"]
        + ["-x", f"http://127.0.0.1:{proxy_port}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(result.stdout)


@dataclass
class Traffic:
    admin: int
    port: int
    targets6: list[str]
    targets4: list[str]
    refused: str


N6, N4 = 4, 2


@pytest.fixture
def traffic(tmp_path: Path, origin_factory: OriginFactory) -> Iterator[Traffic]:
    v6 = origin_factory(listen=["[::1]:0"], name="v6")
    v4 = origin_factory(listen=["127.0.0.1:0"], name="v4")
    port, admin = free_port(), free_port()
    config = tmp_path / "kushi.toml"
    write_toml(
        config,
        {
            "listen": [f"127.0.0.1:{port}"],
            "admin_listen": [f"127.0.0.1:{admin}"],
            "access_log_format": "json",
            "allow_destinations": ["127.0.0.0/8", "::1/128"],
        },
    )
    kushi = start_kushi(
        ["serve", "--config", str(config)], tmp_path, [("127.0.0.1", port), ("127.0.0.1", admin)]
    )
    try:
        targets6 = [v6.url(f"/1k?page={i}") for i in range(N6)]
        targets4 = [v4.url(f"/1k?page={i}") for i in range(N4)]
        for url in targets6 + targets4:
            assert curl_status(port, url) == 200
        refused = f"http://127.0.0.1:{free_port()}/nothing-here"
        assert curl_status(port, refused) == 502
        assert len(kushi.wait_records(N6 + N4 + 1)) == N6 + N4 + 1
        yield Traffic(admin, port, targets6, targets4, refused)
    finally:
        kushi.stop()


def test_status_page_draws_the_traffic(traffic: Traffic) -> None:
    url = f"http://127.0.0.1:{traffic.admin}/"
    result = chromium(
        ["--no-proxy-server", "--window-size=1280,900", "--virtual-time-budget=5000"]
        + ["--dump-dom", url]
    )
    dom = parse_dom(result.stdout)
    body = dom.find_all("body")[0]
    assert body.attrs["data-state"] == "live", result.stdout[:2000]
    assert dom.by_id("state").text == "live"

    # The chart: columns split by family, and a legend with the totals.
    chart = dom.by_id("chart")
    rects6 = chart.find_all("rect", **{"data-family": "ipv6"})
    rects4 = chart.find_all("rect", **{"data-family": "ipv4"})
    assert rects6 and rects4
    assert sum(float(r.attrs["data-count"]) for r in rects6) == N6
    assert sum(float(r.attrs["data-count"]) for r in rects4) == N4
    assert chart.attrs["aria-label"] == (
        f"upstream requests: IPv6 {N6} ({round(100 * N6 / (N6 + N4))}%), "
        f"IPv4 {N4} ({round(100 * N4 / (N6 + N4))}%)"
    )
    legend = {s.attrs["data-family"]: s.attrs["data-count"] for s in dom.by_id("legend").children}
    assert legend == {"ipv6": str(N6), "ipv4": str(N4)}
    assert dom.by_id("v6-share").text == f"{round(100 * N6 / (N6 + N4))}%"
    assert dom.by_id("requests").text == str(N6 + N4 + 1)

    # The recent requests, newest first, with their families.
    rows = dom.by_id("recent").find_all("tr", **{"data-family": "ipv6"})
    rows += dom.by_id("recent").find_all("tr", **{"data-family": "ipv4"})
    rows += dom.by_id("recent").find_all("tr", **{"data-family": "none"})
    assert len(rows) == N6 + N4 + 1
    table = {cells.find_all("td")[3].text: cells for cells in rows}
    assert set(table) == set(traffic.targets6 + traffic.targets4 + [traffic.refused])
    for target in traffic.targets6:
        cells = [td.text for td in table[target].find_all("td")]
        assert cells[1:] == ["127.0.0.1", "GET", target, "200", cells[5], "IPv6"]
        assert cells[5].startswith("[::1]:")
    for target in traffic.targets4:
        cells = [td.text for td in table[target].find_all("td")]
        assert cells[4:] == ["200", cells[5], "IPv4"] and cells[5].startswith("127.0.0.1:")
    refused = [td.text for td in table[traffic.refused].find_all("td")]
    assert refused[4:] == ["502", "—", "none"]
    newest = dom.by_id("recent").find_all("tbody")[0].children[0]
    assert newest.find_all("td")[3].text == traffic.refused

    # Errors by type, and the config in force.
    errors = dom.by_id("errors").find_all("li")
    assert [(e.attrs["data-error"], e.find_all("span")[1].text) for e in errors] == [
        ("connection_refused", "1")
    ]
    assert f"127.0.0.1:{traffic.port}" in dom.by_id("config").text


def test_status_page_screenshots(traffic: Traffic) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{traffic.admin}/"
    for name, size in (("status-page.png", "1280,900"), ("status-page-phone.png", "390,844")):
        path = ARTIFACTS / name
        path.unlink(missing_ok=True)
        chromium(
            ["--no-proxy-server", f"--window-size={size}", "--virtual-time-budget=5000"]
            + [f"--screenshot={path}", url]
        )
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert f"{width},{height}" == size


@pytest.mark.netns
def test_pac_file_sends_an_ipv4_only_browser_through_kushi(tmp_path: Path) -> None:
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with netns.Topology() as topo:
        client = topo.add_host("client", ipv6=False)  # IPv4 only: no IPv6 but ::1
        proxy = topo.add_host("proxy")
        site = topo.add_host("site", ipv4=False)  # IPv6 only
        topo.link(client, proxy, ["198.51.100.2/24"], ["198.51.100.1/24"])
        topo.link(site, proxy, ["2001:db8:6::6/64"], ["2001:db8:6::1/64"])
        topo.wait_ready()
        proxy.hosts({"v6only.test": "2001:db8:6::6"})  # only kushi can resolve the name

        origin = spawn_origin(["[2001:db8:6::6]:8080"], tmp_path / "origin.jsonl", ns=site)
        config = tmp_path / "kushi.toml"
        write_toml(
            config,
            {
                "listen": ["198.51.100.1:3128"],
                "allow": ["198.51.100.0/24"],
                "admin_listen": ["198.51.100.1:9128"],
                "admin_allow": ["198.51.100.0/24"],
                "access_log_format": "json",
            },
        )
        kushi = start_kushi(
            ["serve", "--config", str(config)],
            tmp_path,
            [("198.51.100.1", 3128), ("198.51.100.1", 9128)],
            netns=proxy.ns,
        )
        try:
            result = chromium(
                [
                    "--proxy-pac-url=http://198.51.100.1:9128/proxy.pac",
                    "--virtual-time-budget=5000",
                    "--dump-dom",
                    "http://v6only.test:8080/1k",
                ],
                ns=client,
            )
            assert ONE_K.decode().splitlines()[0] in result.stdout, result.stdout[:2000]
            page = [r for r in origin.wait_requests(1) if r["target"] == "/1k"]
            assert len(page) == 1
            assert (page[0]["client"], page[0]["family"]) == ("2001:db8:6::1", "ipv6")
            headers = {k.lower(): v for k, v in page[0]["headers"]}
            assert headers["host"] == "v6only.test:8080"
            assert headers["via"].startswith("1.1 kushi-")
            records = [r for r in kushi.json_records() if r["target"].endswith("/1k")]
            assert [(r["client"], r["target"], r["family"], r["status"]) for r in records] == [
                ("198.51.100.2", "http://v6only.test:8080/1k", "ipv6", 200)
            ]
        finally:
            kushi.stop()
            origin.stop()
