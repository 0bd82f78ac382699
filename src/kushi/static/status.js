// kushi status page: polls api/status every 2 s and draws it. No libraries, no CDN.
// Everything from the server is inserted as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const FAMILY_NAMES = { ipv6: "IPv6", ipv4: "IPv4", nat64: "NAT64", none: "none" };
let last = null;

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(id, text) {
  $(id).textContent = text;
}

function fmtInt(n) {
  return Math.round(n).toLocaleString("en-US");
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function fmtDuration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(sec).padStart(2, "0")} s`;
  return `${sec} s`;
}

function fmtTime(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString("en-GB", { hour12: false });
}

function pct(part, whole) {
  return whole ? Math.round((100 * part) / whole) + "%" : "–";
}

function setState(state, label) {
  document.body.dataset.state = state;
  const pill = $("state");
  pill.className = "pill " + state;
  pill.textContent = label;
}

// --- summary tiles --------------------------------------------------------------------

function drawTiles(s) {
  const fam = s.totals.by_family;
  const v6 = (fam.ipv6 || 0) + (fam.nat64 || 0);
  const egress = v6 + (fam.ipv4 || 0);
  setText("v6-share", pct(v6, egress));
  setText("v6-hint", egress ? `${fmtInt(v6)} of ${fmtInt(egress)} upstream requests` : "no egress yet");
  setText("requests", fmtInt(s.totals.requests));
  const socks = Object.values(s.totals.socks || {}).reduce((sum, n) => sum + n, 0);
  const datagrams = s.totals.socks_datagrams || 0;
  setText("tunnels", `${fmtInt(s.totals.tunnels)} tunnels` +
    (socks ? ` · ${fmtInt(socks)} SOCKS5` : "") +
    (datagrams ? ` · ${fmtInt(datagrams)} UDP datagrams` : ""));
  setText("open-connections", fmtInt(s.open_connections));
  setText("open-tunnels", s.open_tunnels === null ? "" : `${fmtInt(s.open_tunnels)} tunnels open`);
  const errors = s.errors.reduce((sum, e) => sum + e.count, 0);
  setText("error-count", fmtInt(errors));
  setText("fallbacks", `${fmtInt(s.totals.fallbacks)} Happy Eyeballs fallbacks`);
  setText("bytes-out", fmtBytes(s.totals.bytes_out));
  setText("bytes-in", `to clients · ${fmtBytes(s.totals.bytes_in)} from them`);
}

// --- the chart: share of each family per time bucket, as 100% stacked columns ----------

function drawChart(s) {
  const tl = s.timeline;
  const chart = $("chart");
  const width = Math.max(280, chart.clientWidth || chart.parentNode.clientWidth || 600);
  const height = Math.max(150, chart.clientHeight || 220);
  const left = 40, right = 8, top = 8, bottom = 22;
  const plotW = width - left - right, plotH = height - top - bottom;
  const n = tl.buckets.length;
  const colW = plotW / n;
  const gap = colW > 4 ? Math.min(2, colW * 0.2) : 0;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.replaceChildren();

  for (const p of [0, 50, 100]) {
    const y = top + plotH - (plotH * p) / 100;
    chart.append(svg("line", { class: "gridline", x1: left, x2: width - right, y1: y, y2: y }));
    chart.append(svg("text", { class: "axis", x: left - 6, y: y + 4, "text-anchor": "end" }, `${p}%`));
  }
  const minutes = (n * tl.step) / 60;
  const tickEvery = minutes > 30 ? 10 : 5;
  for (let m = 0; m <= minutes; m += tickEvery) {
    const x = left + plotW - (m * 60 * plotW) / (n * tl.step);
    const anchor = m === 0 ? "end" : "middle";
    chart.append(svg("text", { class: "axis", x, y: height - 6, "text-anchor": anchor }, m === 0 ? "now" : `−${m} min`));
  }

  const sums = {};
  for (const name of tl.families) sums[name] = 0;
  tl.buckets.forEach((row, i) => {
    const counts = row.slice(1);
    const total = counts.reduce((a, b) => a + b, 0);
    const x = left + i * colW + gap / 2;
    const w = Math.max(1, colW - gap);
    if (!total) {
      chart.append(svg("rect", { class: "idle", x, y: top + plotH - 1, width: w, height: 1 }));
      return;
    }
    const group = svg("g", { class: "col", "data-time": row[0], "data-total": total });
    const parts = [];
    let y = top + plotH;
    tl.families.forEach((name, k) => {
      const count = counts[k];
      if (!count) return;
      sums[name] += count;
      const h = (plotH * count) / total;
      y -= h;
      group.append(svg("rect", { class: name, "data-family": name, "data-count": count, x, y, width: w, height: h }));
      parts.push(`${FAMILY_NAMES[name]} ${count} (${pct(count, total)})`);
    });
    group.append(svg("title", {}, `${fmtTime(row[0])}: ${parts.join(", ")}`));
    chart.append(group);
  });

  const total = Object.values(sums).reduce((a, b) => a + b, 0);
  const legend = $("legend");
  legend.replaceChildren();
  const summary = [];
  for (const name of tl.families) {
    if (name === "nat64" && !sums[name]) continue;
    const text = `${FAMILY_NAMES[name]} ${fmtInt(sums[name])} (${pct(sums[name], total)})`;
    const item = el("span", { "data-family": name, "data-count": sums[name] }, text);
    item.style.setProperty("--swatch", `var(--${name})`);
    legend.append(item);
    summary.push(text);
  }
  chart.setAttribute("aria-label", total ? `upstream requests: ${summary.join(", ")}` : "no requests yet");
  setText("chart-window", `last ${Math.round(minutes)} min · ${tl.step} s columns`);
}

// --- recent requests --------------------------------------------------------------------

function drawRecent(s) {
  const body = $("recent").tBodies[0];
  body.replaceChildren();
  for (const r of s.recent) {
    const statusClass = "badge s" + String(r.status || 0)[0];
    const status = el("span", { class: statusClass, title: r.error ? `${r.error}: ${r.details}` : null }, r.status || "—");
    const family = r.family || "none";
    const hop = r.upstream || "—";
    const row = el(
      "tr",
      { "data-family": family, "data-status": r.status },
      el("td", {}, fmtTime(r.time)),
      el("td", { class: "opt", title: r.tls ? "came over " + r.tls : null }, r.tls ? r.client + " 🔒" : r.client),
      el("td", { class: "opt" }, r.method),
      el("td", { class: "target", title: r.target }, r.target),
      el("td", {}, status),
      el("td", { class: "opt", title: r.attempts.length ? "fallback: " + r.attempts.join("; ") : null, "data-source": r.source || null }, r.source ? `${hop} from ${r.source}` : hop),
      el("td", {}, el("span", { class: "fam " + family }, FAMILY_NAMES[family] || family)),
    );
    body.append(row);
  }
  $("recent-empty").hidden = s.recent.length > 0;
  setText("recent-scope", s.recent.length ? `newest first · ${s.recent.length} shown${s.recent_scope ? " · " + s.recent_scope : ""}` : "");
}

// --- errors -----------------------------------------------------------------------------

function drawErrors(s) {
  const list = $("errors");
  list.replaceChildren();
  const max = s.errors.reduce((m, e) => Math.max(m, e.count), 0);
  for (const e of s.errors) {
    const bar = el("i");
    bar.style.width = `${Math.max(2, (100 * e.count) / max)}%`;
    list.append(el("li", { "data-error": e.type }, el("span", { class: "name" }, e.type), el("span", { class: "count" }, fmtInt(e.count)), el("span", { class: "bar" }, bar)));
  }
  $("errors-empty").hidden = s.errors.length > 0;
}

// --- config -----------------------------------------------------------------------------

function showValue(v) {
  if (v === null || v === undefined) return "off";
  if (Array.isArray(v)) return v.length ? v.map(showValue).join(", ") : "—";
  if (typeof v === "object") return JSON.stringify(v);
  if (v === "") return "—";
  return String(v);
}

function section(title, data, open) {
  const dl = el("dl");
  for (const [key, value] of Object.entries(data)) {
    dl.append(el("dt", {}, key), el("dd", {}, showValue(value)));
  }
  const details = el("details", open ? { open: "" } : {}, el("summary", {}, title), dl);
  return details;
}

function drawConfig(s) {
  const box = $("config");
  const c = s.config;
  const json = JSON.stringify(c);
  if (box.dataset.json === json) return; // keep open/closed state while nothing changes
  box.dataset.json = json;
  box.replaceChildren();
  const global = {};
  for (const [key, value] of Object.entries(c)) {
    if (!["listeners", "timeouts", "limits"].includes(key)) global[key] = value;
  }
  box.append(section("global", global, true));
  for (const listener of c.listeners) {
    const { name, ...rest } = listener;
    box.append(section(`listener ${name} (${listener.mode})`, rest, true));
  }
  box.append(section("timeouts (s)", c.timeouts, false));
  box.append(section("limits", c.limits, false));
}

// --- polling ----------------------------------------------------------------------------

function draw(s) {
  setText("version", "v" + s.version);
  setText("pseudonym", s.pseudonym);
  setText("uptime", fmtDuration(s.uptime));
  setText("workers", s.workers > 1 ? `${s.workers} workers (${s.counted})` : "1 worker");
  drawTiles(s);
  drawChart(s);
  drawRecent(s);
  drawErrors(s);
  drawConfig(s);
  if (s.health === "stopping") setState("stopping", "stopping");
  else setState("live", "live");
}

async function poll() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    last = await response.json();
    draw(last);
  } catch (err) {
    setState("offline", "offline");
  }
  setTimeout(poll, POLL_MS);
}

window.addEventListener("resize", () => {
  if (last) drawChart(last);
});
poll();
