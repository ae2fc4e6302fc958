// linewatch dashboard, camera registry: add, change and remove cameras while capture runs, and see
// each camera's health (state, frames/s, last frame, reconnects, capturing worker).
//
// Self-contained on purpose (app.js is the rest of the dashboard): it reads the token app.js keeps
// in localStorage and builds its own section below the camera grid.
"use strict";

(() => {
  const URL_BASE = "/api/v1/cameras/registry";
  const TOKEN_KEY = "linewatch.token";
  const REFRESH_MS = 3000;
  // Reuse the badge colours of style.css: green for live, red for dark.
  const BADGE = { live: "open", dark: "error" };
  let editing = null;

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);  // text nodes: no HTML injection
    return node;
  }

  async function call(path, options = {}) {
    const token = localStorage.getItem(TOKEN_KEY);
    if (!token) return null;
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${token}` };
    const response = await fetch(URL_BASE + path, { ...options, headers });
    if (response.status === 401) return null;  // app.js asks for the token
    const body = response.status === 204 ? null : await response.json();
    if (!response.ok) {
      const detail = body && body.detail;
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail || response.status));
    }
    return body;
  }

  function age(ts) {
    if (!ts) return "-";
    const s = Date.now() / 1000 - ts;
    return s < 120 ? `${s.toFixed(1)} s ago` : new Date(ts * 1000).toLocaleString();
  }

  function build() {
    const form = el("form", { id: "camera-form" },
      el("h3", { class: "camera-form-title" }, "Add a camera"),
      el("input", { name: "id", placeholder: "id", required: "", pattern: "[A-Za-z0-9_.\\-]+" }),
      el("input", { name: "line", placeholder: "line (line-1)" }),
      el("input", { name: "product_class", placeholder: "product class" }),
      el("input", { name: "source", placeholder: "rtsp://… / http://… / folder / file / device" }),
      el("input", { name: "fps", type: "number", step: "any", min: "0", placeholder: "fps" }),
      el("label", {}, el("input", { name: "loop", type: "checkbox" }), " loop"),
      el("button", { type: "submit" }, "Save"),
      el("button", { type: "button", class: "link", id: "camera-form-cancel", hidden: "" }, "cancel"));
    const section = el("section", { id: "camera-registry" },
      el("h2", {}, "Camera registry"),
      el("p", { class: "hint" }, "Capture workers pick changes up within seconds. State: live, reconnecting, " +
        "dark (no frame for capture.dark_after_s: subscriptions got camera_down), unassigned (no worker holds it)."),
      el("table", { id: "camera-registry-table" },
        el("thead", {}, el("tr", {}, ...["id", "line", "class", "state", "frames/s", "last frame", "reconnects",
          "worker", "source", ""].map((h) => el("th", {}, h)))),
        el("tbody")),
      form,
      el("p", { id: "camera-message", class: "message" }));
    const grid = document.getElementById("cameras");
    if (grid) grid.after(section); else document.querySelector("main").prepend(section);
    form.addEventListener("submit", submit);
    document.getElementById("camera-form-cancel").addEventListener("click", () => edit(null));
  }

  function say(text) {
    document.getElementById("camera-message").textContent = text;
  }

  function edit(row) {
    editing = row;
    const form = document.getElementById("camera-form");
    form.reset();
    form.elements.id.disabled = !!row;
    form.elements.product_class.required = !row;
    form.elements.source.required = !row;
    document.getElementById("camera-form-cancel").hidden = !row;
    form.querySelector(".camera-form-title").textContent = row ? `Change camera ${row.id}` : "Add a camera";
    if (!row) return;
    form.elements.id.value = row.id;
    form.elements.line.value = row.line;
    form.elements.product_class.value = row.product_class;
    // The shown source may be masked (credentials): left empty, it stays as it is.
    form.elements.source.placeholder = `${row.source} (unchanged)`;
    form.elements.fps.value = row.fps ?? "";
    form.elements.loop.checked = !!row.loop;
  }

  async function submit(e) {
    e.preventDefault();
    const f = e.target.elements;
    const fps = f.fps.value === "" ? null : Number(f.fps.value);
    try {
      if (editing) {
        const changes = {};
        if (f.line.value && f.line.value !== editing.line) changes.line = f.line.value;
        if (f.product_class.value && f.product_class.value !== editing.product_class) {
          changes.product_class = f.product_class.value;
        }
        if (f.source.value) changes.source = f.source.value;
        if (fps !== editing.fps) changes.fps = fps;
        if (f.loop.checked !== !!editing.loop) changes.loop = f.loop.checked;
        await call(`/${encodeURIComponent(editing.id)}`, { method: "PATCH", body: JSON.stringify(changes),
          headers: { "Content-Type": "application/json" } });
        say(`changed ${editing.id}`);
      } else {
        const body = { id: f.id.value, product_class: f.product_class.value, source: f.source.value,
          loop: f.loop.checked, fps };
        if (f.line.value) body.line = f.line.value;
        await call("", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
        say(`added ${body.id}`);
      }
      edit(null);
      refresh();
    } catch (err) {
      say(`error: ${err.message}`);
    }
  }

  async function remove(row) {
    if (!confirm(`Remove camera ${row.id}? Its capture stops.`)) return;
    try {
      await call(`/${encodeURIComponent(row.id)}`, { method: "DELETE" });
      say(`removed ${row.id}`);
      refresh();
    } catch (err) {
      say(`error: ${err.message}`);
    }
  }

  async function refresh() {
    let rows;
    try {
      rows = await call("");
    } catch (err) {
      say(`error: ${err.message}`);
      return;
    }
    if (!rows) return;
    const tbody = document.querySelector("#camera-registry-table tbody");
    tbody.replaceChildren(...rows.map((r) => {
      const editBtn = el("button", { type: "button", class: "link" }, "change");
      editBtn.addEventListener("click", () => edit(r));
      const removeBtn = el("button", { type: "button", class: "link" }, "remove");
      removeBtn.addEventListener("click", () => remove(r));
      return el("tr", { dataset: { cameraId: r.id, state: r.state } },
        el("td", {}, r.id), el("td", {}, r.line), el("td", {}, r.product_class),
        el("td", {}, el("span", { class: "badge camera-state", dataset: { state: BADGE[r.state] || r.state } },
          r.state)),
        el("td", {}, r.fps_measured == null ? "-" : r.fps_measured.toFixed(1)),
        el("td", {}, age(r.last_frame_ts)), el("td", {}, String(r.reconnects)),
        el("td", {}, r.worker || "-"), el("td", {}, el("code", {}, r.source)),
        el("td", {}, editBtn, " ", removeBtn));
    }));
  }

  document.addEventListener("DOMContentLoaded", () => {
    build();
    refresh();
    setInterval(refresh, REFRESH_MS);
  });
})();
