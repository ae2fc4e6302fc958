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
const SHIFT_REFRESH_MS = 10000;
const TIMELINE_S = 300;
const OPERATOR_KEY = "linewatch.operator";
const SVG_NS = "http://www.w3.org/2000/svg";
// A camera whose newest scored frame is older than this is shown as stale (no frames arriving).
const STALE_S = 15;

let token = null;
let stream = null;
let timers = [];
let shownEvent = null;
let shownEventData = null;
let viewMode = "mask";
let shownCamera = null;
let regions = [];   // the camera view's polygons, [[x, y], ...] in 0..1 of the frame
let drawing = [];   // the polygon being drawn

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

function isRandom(fingerprint) {
  return typeof fingerprint === "string" && fingerprint.includes(":random-");
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
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
// The capture side may report a state (live, reconnecting, dark); otherwise it is derived from the
// age of the newest scored frame.
function cameraState(cam) {
  if (cam.state) return cam.state;
  if (cam.replay_session) return "replay";
  return Date.now() / 1000 - (cam.updated_ts || 0) > STALE_S ? "stale" : "live";
}

function drawTimeline(box, data) {
  const points = data.points || [];
  const threshold = data.threshold;
  box.replaceChildren();
  if (!points.length) return;
  const t1 = Math.max(...points.map((p) => p.ts));
  const t0 = t1 - TIMELINE_S;
  const top = Math.max(1.0, threshold || 0, ...points.map((p) => p.score));
  box.setAttribute("viewBox", `0 0 ${TIMELINE_S} 100`);
  box.setAttribute("preserveAspectRatio", "none");
  const y = (v) => (100 * (1 - v / top)).toFixed(2);
  const line = points.filter((p) => p.ts >= t0).map((p) => `${(p.ts - t0).toFixed(2)},${y(p.score)}`).join(" ");
  box.append(svg("polyline", { points: line }));
  if (typeof threshold === "number") {
    box.append(svg("line", { class: "threshold", x1: 0, x2: TIMELINE_S, y1: y(threshold), y2: y(threshold) }));
  }
  box.dataset.points = String(points.length);
  box.dataset.threshold = String(threshold);
}

async function refreshCameras() {
  const cameras = await apiJson("/cameras");
  const grid = $("#camera-grid");
  const seen = new Set();
  for (const cam of cameras) {
    seen.add(cam.camera_id);
    let tile = grid.querySelector(`figure[data-camera-id="${CSS.escape(cam.camera_id)}"]`);
    if (!tile) {
      tile = el("figure", { class: "camera", dataset: { cameraId: cam.camera_id } },
        el("img", { class: "latest", alt: `latest frame of ${cam.camera_id}` }), svg("svg", { class: "timeline" }),
        el("figcaption"));
      tile.addEventListener("click", () => openCamera(cam.camera_id).catch(report));
      grid.append(tile);
    }
    const state = cameraState(cam);
    tile.dataset.state = state;
    const caption = tile.querySelector("figcaption");
    caption.replaceChildren(
      el("strong", {}, cam.camera_id), " ", el("span", { class: "state", dataset: { state } }, state),
      ` ${cam.line_id} · ${cam.product_class}`, el("br"),
      `score ${fmtScore(cam.image_score)} · #${cam.seq} · ${fmtTime(cam.capture_ts)}`,
      ...(cam.replay_session ? [" ", el("span", { class: "tag replay" }, `replay ${cam.replay_session}`)] : []),
      ...(isRandom(cam.model_fingerprint) ? [el("br"), el("span", { class: "random" }, "RANDOM WEIGHTS: scores mean nothing")] : []));
    if (tile.dataset.updated !== String(cam.updated_ts)) {
      tile.dataset.updated = String(cam.updated_ts);
      await loadImage(tile.querySelector("img"), cam.latest_url);
      const data = await apiJson(`/cameras/${encodeURIComponent(cam.camera_id)}/timeline?seconds=${TIMELINE_S}`);
      drawTimeline(tile.querySelector("svg.timeline"), data);
      if (shownCamera === cam.camera_id) loadImage($("#camera-view img.frame"), cam.latest_url).catch(report);
    }
  }
  for (const tile of grid.querySelectorAll("figure[data-camera-id]")) {
    if (!seen.has(tile.dataset.cameraId)) tile.remove();
  }
  $("#cameras-empty").hidden = cameras.length > 0;
}

// -- camera view: threshold and ignore regions ------------------------------------------------------
function tuningPath(cameraId) {
  return `/cameras/${encodeURIComponent(cameraId)}/tuning`;
}

function showTuning(t) {
  const view = $("#camera-view");
  view.dataset.threshold = String(t.effective_threshold);
  $("#threshold-form input[name=threshold]").value = t.effective_threshold;
  const source = t.threshold_override !== null ? "this camera's own threshold"
    : t.class_threshold !== null ? `the ${t.product_class} class threshold` : "the default threshold";
  $(".threshold-info", view).textContent = `in effect: ${fmtScore(t.effective_threshold)} (${source})`;
  regions = t.ignore_regions.map((poly) => poly.map(([x, yy]) => [x, yy]));
  drawing = [];
  drawRegions();
}

function drawRegions() {
  const layer = $("#camera-view svg.regions-layer");
  const pts = (poly) => poly.map(([x, yy]) => `${x},${yy}`).join(" ");
  layer.replaceChildren(...regions.map((poly) => svg("polygon", { points: pts(poly) })),
    ...(drawing.length ? [svg("polyline", { points: pts(drawing) })] : []));
  $("#camera-view").dataset.regions = String(regions.length);
  $("#camera-view .regions-info").textContent =
    `${regions.length} region(s)` + (drawing.length ? `, drawing: ${drawing.length} point(s)` : "");
}

async function openCamera(cameraId) {
  shownCamera = cameraId;
  const view = $("#camera-view");
  view.hidden = false;
  view.dataset.cameraId = cameraId;
  $(".camera-id", view).textContent = cameraId;
  await loadImage($("img.frame", view), `/cameras/${encodeURIComponent(cameraId)}/latest.jpg`);
  showTuning(await apiJson(tuningPath(cameraId)));
}

async function saveTuning(body, what) {
  const t = await apiJson(tuningPath(shownCamera), {
    method: "PUT", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, by: operator() }),
  });
  showTuning(t);
  $("#camera-view").dataset.saved = what;
}

function initCameraView() {
  const view = $("#camera-view");
  $("img.frame", view).addEventListener("click", (e) => {
    const box = e.target.getBoundingClientRect();
    const x = Math.min(1, Math.max(0, (e.clientX - box.left) / box.width));
    const yy = Math.min(1, Math.max(0, (e.clientY - box.top) / box.height));
    drawing.push([Number(x.toFixed(4)), Number(yy.toFixed(4))]);
    drawRegions();
  });
  $(".close-polygon", view).addEventListener("click", () => {
    if (drawing.length < 3) { $(".regions-info", view).textContent = "a polygon needs at least 3 points"; return; }
    regions.push(drawing);
    drawing = [];
    drawRegions();
  });
  $(".undo-point", view).addEventListener("click", () => { drawing.pop(); drawRegions(); });
  $(".clear-regions", view).addEventListener("click", () => { regions = []; drawing = []; drawRegions(); });
  $(".save-regions", view).addEventListener("click", () =>
    saveTuning({ ignore_regions: regions }, "regions").catch(report));
  $("#threshold-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = Number(new FormData(e.target).get("threshold"));
    saveTuning({ threshold: value }, "threshold").catch(report);
  });
  $("#threshold-form .reset").addEventListener("click", () => saveTuning({ threshold: null }, "threshold").catch(report));
  $(".close", view).addEventListener("click", () => { view.hidden = true; shownCamera = null; });
}

function operator() {
  const name = $("#operator").value.trim();
  return name || null;
}

// -- shift statistics ------------------------------------------------------------------------------
async function refreshShift() {
  const stats = await apiJson("/stats");
  $("#shift-table tbody").replaceChildren(...stats.cameras.map((row) =>
    el("tr", { dataset: { cameraId: row.camera_id } }, el("td", {}, row.camera_id), el("td", { class: "events" }, String(row.events)),
      el("td", {}, String(row.confirmed)), el("td", {}, String(row.false_alarm)), el("td", {}, String(row.unlabelled)),
      el("td", { class: "rate" }, row.false_alarm_rate === null ? "–" : `${(100 * row.false_alarm_rate).toFixed(0)} %`))));
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
  // Stream messages carry no label: keep the one already shown.
  if (shownEvent === ev.event_id) {
    const label = ev.label !== undefined ? ev.label : (shownEventData && shownEventData.label) || null;
    renderEvent({ ...ev, label });
  }
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
  shownEventData = ev;
  const view = $("#event-view");
  view.hidden = false;
  view.dataset.eventId = ev.event_id;
  view.dataset.status = ev.status;
  $(".event-id", view).textContent = ev.event_id;
  const prov = ev.provenance || {};
  $(".random-warning", view).hidden = !isRandom(prov.model_fingerprint);
  const peak = $(".verdict .peak", view);
  peak.textContent = `peak ${fmtScore(ev.peak_score)} vs threshold ${fmtScore(ev.threshold)}`;
  peak.classList.toggle("over", ev.peak_score >= ev.threshold);
  const label = ev.label;
  view.dataset.label = label ? label.label : "";
  $(".verdict .label-state", view).replaceChildren(...(label
    ? [el("span", { class: `tag ${label.label}` }, label.label === "false_alarm" ? "false alarm" : "confirmed"),
      ` ${label.by ? `by ${label.by} ` : ""}${fmtTime(label.labelled_ts)}`]
    : ["not labelled"]));
  const fields = [
    ["status", ev.status], ["camera", ev.camera_id], ["line", ev.line_id], ["class", ev.product_class],
    ["peak score", fmtScore(ev.peak_score)], ["threshold", fmtScore(ev.threshold)],
    ["frames", `${ev.n_frames} (#${ev.first_seq}–#${ev.last_seq}, peak #${ev.peak_seq})`],
    ["started", fmtTime(ev.first_ts)], ["last seen", fmtTime(ev.last_ts)], ["size", `${ev.width}×${ev.height}`],
    ["session", ev.replay_session ? `replay ${ev.replay_session}` : "live"],
    ["method", prov.method || ""], ["references", prov.reference_version || "none"],
    ["prompts", prov.prompt_version || ""], ["model", prov.model_fingerprint || ""],
    ...(label && label.note ? [["note", label.note]] : []),
    ...(label && label.reference_version ? [["taught", label.reference_version]] : []),
  ];
  $("dl.fields", view).replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  $("table.regions tbody", view).replaceChildren(...ev.regions.map((r) =>
    el("tr", {}, ...[r.x, r.y, r.width, r.height, r.area].map((v) => el("td", {}, String(v))))));
  showMode(viewMode);
}

function showMode(mode) {
  viewMode = mode;
  const view = $("#event-view");
  view.dataset.mode = mode;
  for (const b of view.querySelectorAll(".modes button")) b.classList.toggle("active", b.dataset.mode === mode);
  $(".legend", view).hidden = mode !== "heat";
  $(".legend-mask", view).hidden = mode !== "mask";
  if (!shownEventData) return;
  loadImage($("img.overlay", view), `/events/${encodeURIComponent(shownEventData.event_id)}/view/${mode}.jpg`)
    .catch(report);
}

async function labelShown(value) {
  if (!shownEventData) return;
  const view = $("#event-view");
  const message = $(".label-message", view);
  message.textContent = value === "false_alarm" ? "teaching the normal references…" : "saving…";
  const result = await apiJson(`/events/${encodeURIComponent(shownEventData.event_id)}/label`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ label: value, note: $(".label-note", view).value || null, by: operator() }),
  });
  const label = result.label;
  message.textContent = label.teach_error ? `labelled, but not taught: ${label.teach_error}`
    : label.reference_version ? `false alarm: its frame joined ${label.reference_version}; scorers use it within seconds`
      : `labelled ${label.label === "false_alarm" ? "false alarm" : "confirmed"}`;
  renderEvent({ ...shownEventData, label });
  refreshShift().catch(report);
}

function initEventView() {
  const view = $("#event-view");
  for (const b of view.querySelectorAll(".modes button")) b.addEventListener("click", () => showMode(b.dataset.mode));
  $(".label-confirm", view).addEventListener("click", () => labelShown("confirmed").catch(report));
  $(".label-false", view).addEventListener("click", () => labelShown("false_alarm").catch(report));
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
  every(SHIFT_REFRESH_MS, refreshShift);
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
  $("#operator").value = localStorage.getItem(OPERATOR_KEY) || "";
  $("#operator").addEventListener("change", () => localStorage.setItem(OPERATOR_KEY, $("#operator").value.trim()));
  initCameraView();
  initEventView();
  $("#subscription-form").addEventListener("submit", (e) => {
    e.preventDefault();
    addSubscription(e.target).catch(report);
  });
  if (token) start(); else askToken();
}

document.addEventListener("DOMContentLoaded", init);
