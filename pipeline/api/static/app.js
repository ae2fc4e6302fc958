// linewatch dashboard: plain JS, no build step, nothing loaded from elsewhere.
//
// The token comes from ?token= (then kept in localStorage and removed from the address bar) or the
// token form. JSON and images are fetched with an Authorization header (images become blob: URLs),
// so the token appears in a URL only for the event stream, which EventSource cannot send headers for.
// The feed shows live and replayed events alike (replays are what you test alert rules with); a
// replayed event carries a "replay <session>" tag.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "linewatch.token";
const MAX_FEED = 200;
const CAMERA_REFRESH_MS = 3000;
const SUBS_REFRESH_MS = 30000;

let token = null;
let stream = null;
let timers = [];
let shownEvent = null;

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);  // strings become text nodes: no HTML injection
  return node;
}

function fmtTime(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "";
}

function fmtScore(x) {
  return typeof x === "number" ? x.toFixed(3) : "";
}

// -- API access ----------------------------------------------------------------------------------
class Unauthorized extends Error {}

// `path` is relative to /api/v1, or a full path such as the links the API returns.
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token}` };
  const response = await fetch(path.startsWith(`${API}/`) ? path : API + path, { ...options, headers });
  if (response.status === 401) {
    askToken("The token was rejected.");
    throw new Unauthorized(path);
  }
  return response;
}

async function apiJson(path, options = {}) {
  const response = await api(path, options);
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const detail = body && body.detail;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail || response.status));
  }
  return body;
}

// Fetch an image with the token and show it as a blob: URL, releasing the one it replaces.
async function loadImage(img, path) {
  const response = await api(path);
  if (!response.ok) return;
  const url = URL.createObjectURL(await response.blob());
  const previous = img.dataset.blob;
  img.src = url;
  img.dataset.blob = url;
  if (previous) URL.revokeObjectURL(previous);
}

// -- token ---------------------------------------------------------------------------------------
function askToken(message = "") {
  stop();
  $("#token-form").hidden = false;
  $("#token-message").textContent = message;
  $("#token-input").focus();
}

function takeTokenFromUrl() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("token");
  if (!fromUrl) return;
  localStorage.setItem(TOKEN_KEY, fromUrl);
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}

// -- cameras -------------------------------------------------------------------------------------
async function refreshCameras() {
  const cameras = await apiJson("/cameras");
  const grid = $("#camera-grid");
  const seen = new Set();
  for (const cam of cameras) {
    seen.add(cam.camera_id);
    let tile = grid.querySelector(`figure[data-camera-id="${CSS.escape(cam.camera_id)}"]`);
    if (!tile) {
      tile = el("figure", { class: "camera", dataset: { cameraId: cam.camera_id } },
        el("img", { class: "latest", alt: `latest frame of ${cam.camera_id}` }), el("figcaption"));
      grid.append(tile);
    }
    const caption = tile.querySelector("figcaption");
    caption.replaceChildren(
      el("strong", {}, cam.camera_id), ` ${cam.line_id} · ${cam.product_class}`, el("br"),
      `score ${fmtScore(cam.image_score)} · #${cam.seq} · ${fmtTime(cam.capture_ts)}`,
      ...(cam.replay_session ? [" ", el("span", { class: "tag replay" }, `replay ${cam.replay_session}`)] : []));
    if (tile.dataset.updated !== String(cam.updated_ts)) {
      tile.dataset.updated = String(cam.updated_ts);
      await loadImage(tile.querySelector("img"), cam.latest_url);
    }
  }
  for (const tile of grid.querySelectorAll("figure[data-camera-id]")) {
    if (!seen.has(tile.dataset.cameraId)) tile.remove();
  }
  $("#cameras-empty").hidden = cameras.length > 0;
}

// -- events --------------------------------------------------------------------------------------
function eventItem(ev) {
  const li = el("li", { dataset: { eventId: ev.event_id } },
    el("img", { class: "thumb", alt: `thumbnail of ${ev.event_id}` }), el("div", { class: "meta" }));
  li.addEventListener("click", () => showEvent(ev.event_id));
  loadImage(li.querySelector("img"), ev.links.thumbnail).catch(() => {});
  return li;
}

function fillItem(li, ev) {
  li.dataset.status = ev.status;
  li.dataset.replaySession = ev.replay_session || "";
  li.classList.toggle("replay", Boolean(ev.replay_session));
  li.querySelector(".meta").replaceChildren(
    el("span", {},
      el("strong", { class: "camera" }, ev.camera_id), " ",
      el("span", { class: `tag status ${ev.status}` }, ev.status),
      ...(ev.replay_session ? [" ", el("span", { class: "tag replay" }, `replay ${ev.replay_session}`)] : [])),
    el("span", { class: "score" }, `score ${fmtScore(ev.peak_score)} (threshold ${fmtScore(ev.threshold)})`),
    el("time", { class: "time" }, fmtTime(ev.first_ts)));
}

// Insert or update; a new event goes on top (arrival order: a replayed event's time may be old).
function upsertEvent(ev, position = "top") {
  const list = $("#events");
  let li = list.querySelector(`li[data-event-id="${CSS.escape(ev.event_id)}"]`);
  if (!li) {
    li = eventItem(ev);
    if (position === "top") list.prepend(li); else list.append(li);
    while (list.children.length > MAX_FEED) list.lastElementChild.remove();
  }
  fillItem(li, ev);
  $("#events-empty").hidden = true;
  if (shownEvent === ev.event_id) renderEvent(ev);
}

async function loadRecent() {
  const page = await apiJson(`/events?session=${encodeURIComponent("*")}&limit=50`);
  const list = $("#events");
  if (list.children.length === 0) {
    for (const ev of page.events) upsertEvent(ev, "bottom");
  } else {
    // After a reconnect: add what was missed (oldest first, so the newest ends on top).
    for (const ev of [...page.events].reverse()) {
      if (!list.querySelector(`li[data-event-id="${CSS.escape(ev.event_id)}"]`)) upsertEvent(ev, "top");
    }
  }
  $("#events-empty").hidden = list.children.length > 0;
}

function setStreamState(state, text) {
  const badge = $("#stream-status");
  badge.dataset.state = state;
  badge.textContent = text;
  document.body.dataset.stream = state;
}

function connectStream() {
  if (stream) stream.close();
  setStreamState("connecting", "connecting…");
  stream = new EventSource(`${API}/stream?token=${encodeURIComponent(token)}`);
  stream.addEventListener("open", () => {
    document.body.dataset.streamOpens = String(Number(document.body.dataset.streamOpens || 0) + 1);
    setStreamState("open", "live");
    loadRecent().catch(report);
  });
  stream.addEventListener("defect", (message) => upsertEvent(JSON.parse(message.data)));
  stream.addEventListener("error", () => {
    if (stream.readyState === EventSource.CLOSED) {
      // Refused (e.g. 401): find out why through a normal request, then retry.
      setStreamState("error", "disconnected");
      apiJson("/cameras").then(() => setTimeout(connectStream, 3000)).catch(report);
    } else {
      setStreamState("connecting", "reconnecting…");
    }
  });
}

// -- event view ----------------------------------------------------------------------------------
async function showEvent(eventId) {
  shownEvent = eventId;
  for (const li of document.querySelectorAll("#events li.selected")) li.classList.remove("selected");
  const li = $(`#events li[data-event-id="${CSS.escape(eventId)}"]`);
  if (li) li.classList.add("selected");
  renderEvent(await apiJson(`/events/${encodeURIComponent(eventId)}`));
}

function renderEvent(ev) {
  const view = $("#event-view");
  view.hidden = false;
  view.dataset.eventId = ev.event_id;
  view.dataset.status = ev.status;
  $(".event-id", view).textContent = ev.event_id;
  const fields = [
    ["status", ev.status], ["camera", ev.camera_id], ["line", ev.line_id], ["class", ev.product_class],
    ["peak score", fmtScore(ev.peak_score)], ["threshold", fmtScore(ev.threshold)],
    ["frames", `${ev.n_frames} (#${ev.first_seq}–#${ev.last_seq}, peak #${ev.peak_seq})`],
    ["started", fmtTime(ev.first_ts)], ["last seen", fmtTime(ev.last_ts)], ["size", `${ev.width}×${ev.height}`],
    ["session", ev.replay_session ? `replay ${ev.replay_session}` : "live"],
  ];
  $("dl.fields", view).replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  $("table.regions tbody", view).replaceChildren(...ev.regions.map((r) =>
    el("tr", {}, ...[r.x, r.y, r.width, r.height, r.area].map((v) => el("td", {}, String(v))))));
  loadImage($("img.overlay", view), ev.links.overlay).catch(report);
}

// -- subscriptions -------------------------------------------------------------------------------
function subMessage(text) {
  $("#subscription-message").textContent = text;
}

async function refreshSubscriptions() {
  const subs = await apiJson("/subscriptions");
  $("#subscriptions-table tbody").replaceChildren(...subs.map((sub) => {
    const ch = sub.channel;
    const filters = Object.entries(sub.filters).filter(([, v]) => v !== null && !(Array.isArray(v) && !v.length));
    const test = el("button", { type: "button", class: "test" }, "test");
    const remove = el("button", { type: "button", class: "remove" }, "remove");
    test.addEventListener("click", async () => {
      const result = await apiJson(`/subscriptions/${encodeURIComponent(sub.id)}/test`, { method: "POST" });
      subMessage(result.ok ? `test delivery to ${sub.id} accepted` : `test delivery to ${sub.id} failed: ${result.error}`);
    });
    remove.addEventListener("click", async () => {
      if (!confirm(`Remove subscription ${sub.id} and its dead letters?`)) return;
      await apiJson(`/subscriptions/${encodeURIComponent(sub.id)}`, { method: "DELETE" });
      subMessage(`removed ${sub.id}`);
      refreshSubscriptions().catch(report);
    });
    return el("tr", { dataset: { subscriptionId: sub.id } },
      el("td", {}, sub.id), el("td", {}, ch.type), el("td", {}, ch.url || ch.topic || ch.stream || ""),
      el("td", {}, filters.map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ")),
      el("td", {}, String(sub.dead_letters)), el("td", {}, test, " ", remove));
  }));
}

async function addSubscription(form) {
  const data = new FormData(form);
  const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
  const channel = { type: "webhook", url: data.get("url") };
  if (data.get("secret")) channel.secret = data.get("secret");
  const filters = { cameras: list(data.get("cameras") || "") };
  if (data.get("min_peak_score")) filters.min_peak_score = Number(data.get("min_peak_score"));
  const result = await apiJson("/subscriptions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id: data.get("id"), channel, filters }),
  });
  subMessage(result.secret
    ? `added ${result.subscription.id}; signing secret (shown once, keep it with the receiver): ${result.secret}`
    : `added ${result.subscription.id}`);
  form.reset();
  await refreshSubscriptions();
}

// -- lifecycle -----------------------------------------------------------------------------------
function report(err) {
  if (err instanceof Unauthorized) return;
  console.error(err);
  subMessage(String(err.message || err));
}

function every(ms, fn) {
  fn().catch(report);
  timers.push(setInterval(() => fn().catch(report), ms));
}

function stop() {
  if (stream) stream.close();
  stream = null;
  timers.forEach(clearInterval);
  timers = [];
  setStreamState("closed", "not connected");
}

function start() {
  stop();
  $("#token-form").hidden = true;
  connectStream();
  every(CAMERA_REFRESH_MS, refreshCameras);
  every(SUBS_REFRESH_MS, refreshSubscriptions);
}

function init() {
  takeTokenFromUrl();
  token = localStorage.getItem(TOKEN_KEY);
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("#token-input").value.trim();
    localStorage.setItem(TOKEN_KEY, token);
    start();
  });
  $("#forget-token").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    token = null;
    askToken();
  });
  $("#subscription-form").addEventListener("submit", (e) => {
    e.preventDefault();
    addSubscription(e.target).catch(report);
  });
  if (token) start(); else askToken();
}

document.addEventListener("DOMContentLoaded", init);
