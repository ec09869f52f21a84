// roost's dashboard: reads the admin API (the same JSON and /metrics as everything
// else, with the same bearer token) every two seconds and draws what it says. No
// libraries, nothing fetched from elsewhere: it works offline.
"use strict";

const PERIOD_MS = 2000;
const HISTORY = 90; // points kept for the graph and the sparklines (3 minutes)

const state = {
  token: localStorage.getItem("roost-admin-token") || "",
  previous: null, // {at, received, sent} of the last /metrics read
  rates: [], // [{in, out}]
  history: new Map(), // sparkline key -> [numbers]
};

const $ = (id) => document.getElementById(id);

async function api(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) {
    $("login").hidden = false;
    throw new Error("the admin API wants a token");
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return path === "/metrics" ? response.text() : response.json();
}

/// The cluster as this node sees it, or null when the node is not part of one (404).
async function cluster() {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch("/api/v1/cluster", { headers, cache: "no-store" });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`/api/v1/cluster: HTTP ${response.status}`);
  return response.json();
}

/// Moves a queue's dead letters back into it (POST .../dlq/redrive), then redraws.
async function redrive(queue) {
  if (!confirm(`Move every dead letter of ${queue} back into the queue?`)) return;
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(`/api/v1/queues/${encodeURIComponent(queue)}/dlq/redrive`, {
    method: "POST", headers, body: "{}",
  });
  $("status").textContent = response.ok ? `dead letters of ${queue} redriven` : `redrive: HTTP ${response.status}`;
  refresh();
}

/// Prometheus text format -> Map(name -> [{labels, value}]).
function parseMetrics(text) {
  const families = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    if (!families.has(m[1])) families.set(m[1], []);
    families.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return families;
}

const total = (metrics, name) =>
  (metrics.get(name) || []).reduce((sum, s) => sum + s.value, 0);

function remember(key, value) {
  const series = state.history.get(key) || [];
  series.push(value);
  if (series.length > HISTORY) series.shift();
  state.history.set(key, series);
  return series;
}

function sparkline(series) {
  const max = Math.max(1, ...series);
  const step = series.length > 1 ? 80 / (series.length - 1) : 0;
  const points = series.map((v, i) => `${(i * step).toFixed(1)},${(19 - (v / max) * 18).toFixed(1)}`);
  return `<svg class="spark" viewBox="0 0 80 20"><polyline points="${points.join(" ")}"/></svg>`;
}

const escape = (s) =>
  String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

function fillTable(id, rows, columns) {
  const body = $(id).querySelector("tbody");
  if (rows.length === 0) {
    body.innerHTML = `<tr><td class="empty" colspan="${columns}">none</td></tr>`;
    return;
  }
  body.innerHTML = rows.map((cells) => `<tr>${cells.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("");
}

function drawRates() {
  const canvas = $("rates");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const max = Math.max(1, ...state.rates.flatMap((r) => [r.in, r.out]));
  ctx.fillStyle = "#6b7280";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(`${Math.round(max)}/s`, 4, 12);
  const step = width / (HISTORY - 1);
  for (const [key, color] of [["in", "#2563eb"], ["out", "#16a34a"]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    state.rates.forEach((r, i) => {
      const x = width - (state.rates.length - 1 - i) * step;
      const y = height - 4 - (r[key] / max) * (height - 20);
      i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function renderMetrics(metrics) {
  $("stat-connections").textContent = total(metrics, "roost_connections");
  $("stat-sessions").textContent = total(metrics, "roost_sessions");
  $("stat-subscriptions").textContent = total(metrics, "roost_subscriptions");
  $("stat-retained").textContent = total(metrics, "roost_retained_messages");
  const now = { at: performance.now(), received: total(metrics, "roost_messages_received_total"), sent: total(metrics, "roost_messages_sent_total") };
  if (state.previous) {
    const seconds = Math.max(0.001, (now.at - state.previous.at) / 1000);
    const rate = { in: (now.received - state.previous.received) / seconds, out: (now.sent - state.previous.sent) / seconds };
    state.rates.push(rate);
    if (state.rates.length > HISTORY) state.rates.shift();
    $("stat-in-rate").textContent = rate.in.toFixed(1);
    $("stat-out-rate").textContent = rate.out.toFixed(1);
  }
  state.previous = now;
  drawRates();
  const dropped = (metrics.get("roost_messages_dropped_total") || []).map((s) => [escape(s.labels.reason), s.value]);
  for (const s of metrics.get("roost_bridge_messages_dropped_total") || []) {
    if (s.value > 0) dropped.push([`bridge ${escape(s.labels.bridge)}: ${escape(s.labels.reason)}`, s.value]);
  }
  fillTable("dropped", dropped, 2);
}

function renderQueues(queues) {
  const rows = [];
  for (const q of queues) {
    const depth = remember(`depth:${q.name}`, q.depth);
    const dead = q.dead_letters > 0
      ? `${q.dead_letters} <button class="redrive" data-queue="${escape(q.name)}">redrive</button>`
      : q.dead_letters;
    const head = [`<b>${escape(q.name)}</b>`, q.depth, sparkline(depth), dead];
    if (q.groups.length === 0) rows.push([...head, "<i>no group</i>", "", "", "", "", ""]);
    q.groups.forEach((g, i) => {
      const key = `${q.name}/${g.group}/${g.filter ?? ""}`;
      const lag = remember(`lag:${key}`, g.lag);
      const inflight = remember(`inflight:${key}`, g.in_flight);
      const group = escape(g.group) + (g.filter ? ` <code>${escape(g.filter)}</code>` : "");
      rows.push([...(i === 0 ? head : ["", "", "", ""]), group, escape(g.members.join(", ")), g.lag, sparkline(lag), g.in_flight, sparkline(inflight)]);
    });
  }
  fillTable("queues", rows, 10);
}

function renderCluster(c) {
  $("cluster-section").hidden = c === null;
  if (c === null) return;
  $("cluster-summary").textContent =
    `node ${c.node_id}; control-plane leader: ${c.leader === null ? "none (no majority reachable)" : `node ${c.leader}`}`;
  fillTable("nodes", c.members.map((m) => [
    `${m.id}${m.id === c.node_id ? " (this node)" : ""}`, escape(m.cluster_addr),
    m.up ? '<span class="up">up</span>' : '<span class="down">down</span>',
    m.voter ? "voter" : "learner", m.id === c.leader ? "leader" : "",
  ]), 5);
}

function renderBridges(bridges) {
  fillTable("bridges", bridges.map((b) => [
    escape(b.name), escape(b.address),
    b.up ? '<span class="up">up</span>' : `<span class="down" title="${escape(b.last_error)}">down</span>`,
    b.forwarded_out, b.forwarded_in, b.queued,
    b.dropped.queue_full + b.dropped.remote_refused + b.dropped.unmapped,
  ]), 7);
}

function renderClients(clients, sessions) {
  fillTable("clients", clients.map((c) => [
    escape(c.client_id), escape(c.username ?? ""), escape(c.peer), escape(c.protocol),
    new Date(c.connected_at_ms).toLocaleTimeString(),
  ]), 5);
  fillTable("sessions", sessions.map((s) => [
    escape(s.client_id), s.online ? "yes" : "no", s.subscriptions ?? "", s.queued_messages ?? "",
  ]), 4);
}

async function refresh() {
  try {
    const [metrics, clients, sessions, queues, bridges, nodes] = await Promise.all([
      api("/metrics"), api("/api/v1/clients"), api("/api/v1/sessions"),
      api("/api/v1/queues"), api("/api/v1/bridges"), cluster(),
    ]);
    renderCluster(nodes);
    renderMetrics(parseMetrics(metrics));
    renderQueues(queues);
    renderBridges(bridges);
    renderClients(clients, sessions);
    $("status").textContent = "live";
    $("status").className = "status ok";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = String(e.message || e);
    $("status").className = "status bad";
  }
}

$("queues").addEventListener("click", (event) => {
  const button = event.target.closest("button.redrive");
  if (button) redrive(button.dataset.queue);
});

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  localStorage.setItem("roost-admin-token", state.token);
  $("login").hidden = true;
  refresh();
});

refresh();
setInterval(refresh, PERIOD_MS);
