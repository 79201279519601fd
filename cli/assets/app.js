// taskmesh dashboard: polls /api/stats every 1.5 s with the bearer token kept in
// sessionStorage; DLQ browsing with replay; schedule pause/resume/trigger; category
// pause/resume. No build step, no dependencies.
"use strict";

const POLL_MS = 1500;
const $ = (sel) => document.querySelector(sel);
let prev = null; // previous stats sample, for rates

function token() { return sessionStorage.getItem("taskmesh.token") || ""; }

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!r.ok) {
    const why = data && data.detail ? data.detail : r.status + " " + r.statusText;
    const err = new Error(why);
    err.status = r.status;
    throw err;
  }
  return data;
}

function say(text, bad) {
  const m = $("#message");
  m.textContent = text;
  m.className = bad ? "bad" : "";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function button(td, label, onclick, attrs) {
  const b = document.createElement("button");
  b.textContent = label;
  for (const [k, v] of Object.entries(attrs || {})) b.setAttribute(k, v);
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onclick(); } catch (e) { say(label + " failed: " + e.message, true); }
    b.disabled = false;
    refresh();
  });
  td.appendChild(b);
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function ago(iso) {
  if (!iso) return "-";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  return s < 60 ? s + "s ago" : Math.round(s / 60) + "m ago";
}

function renderStats(st) {
  const now = Date.parse(st.generated_at);
  const rows = st.categories.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.category = c.category;
    let tput = "-", fails = "-";
    const p = prev && prev.categories.find((x) => x.category === c.category);
    if (p) {
      const dt = Math.max((now - Date.parse(prev.generated_at)) / 1000, 0.001);
      // finished = stored before + arrived since - stored now (WorkQueue streams drop acked tasks)
      const done = p.messages + (c.last_sequence - p.last_sequence) - c.messages;
      tput = Math.max(done / dt, 0).toFixed(1);
      fails = Math.max((c.dlq - p.dlq) / dt * 60, 0).toFixed(1);
    }
    cell(tr, c.category);
    cell(tr, c.pending).className = "pending";
    cell(tr, c.in_flight);
    cell(tr, c.lanes.reduce((n, l) => n + l.redelivered, 0));
    cell(tr, tput);
    cell(tr, fails);
    cell(tr, c.dlq, c.dlq > 0 ? "bad" : "");
    cell(tr, c.consumers);
    cell(tr, c.paused ? "paused" : "active", c.paused ? "paused" : "");
    const td = cell(tr, "");
    if (c.paused) {
      button(td, "Resume", () => api("POST", `/api/categories/${c.category}/resume`), { "data-action": "resume" });
    } else {
      button(td, "Pause", () => api("POST", `/api/categories/${c.category}/pause`), { "data-action": "pause" });
    }
    return tr;
  });
  fill($("#queues tbody"), rows);
  prev = st;

  $("#worker-count").textContent = "(" + st.workers.length + " live)";
  fill($("#workers tbody"), st.workers.map((w) => {
    const tr = document.createElement("tr");
    cell(tr, w.id); cell(tr, w.categories.join(", "));
    cell(tr, w.in_flight + "/" + w.concurrency); cell(tr, w.host);
    cell(tr, w.version); cell(tr, ago(w.beat_at));
    return tr;
  }));

  $("#leader").textContent = st.scheduler_leader ? "(leader " + st.scheduler_leader + ")" : "(no scheduler running)";
  fill($("#schedules tbody"), st.schedules.map((s) => {
    const tr = document.createElement("tr");
    cell(tr, s.name); cell(tr, s.task);
    cell(tr, s.state, s.state === "paused" ? "paused" : s.state === "invalid" ? "bad" : "");
    cell(tr, s.next_fire); cell(tr, s.last_fired);
    const td = cell(tr, "");
    button(td, "Trigger", async () => {
      const r = await api("POST", `/api/schedules/${encodeURIComponent(s.name)}/trigger`);
      say("fired " + s.name + ": task " + r.id);
    });
    if (s.state === "paused") button(td, "Resume", () => api("POST", `/api/schedules/${encodeURIComponent(s.name)}/resume`));
    else if (s.state === "enabled") button(td, "Pause", () => api("POST", `/api/schedules/${encodeURIComponent(s.name)}/pause`));
    return tr;
  }));
}

async function refreshDlq() {
  const q = new URLSearchParams();
  if ($("#dlq-task").value.trim()) q.set("task", $("#dlq-task").value.trim());
  if ($("#dlq-reason").value) q.set("reason", $("#dlq-reason").value);
  q.set("limit", "200");
  const list = await api("GET", "/api/dlq?" + q);
  fill($("#dlq tbody"), list.map((d) => {
    const tr = document.createElement("tr");
    tr.dataset.seq = d.seq;
    tr.dataset.taskId = d.task_id || "";
    cell(tr, d.seq); cell(tr, d.task); cell(tr, d.task_id); cell(tr, d.reason);
    cell(tr, d.attempts); cell(tr, new Date(d.time).toLocaleString());
    cell(tr, d.error, "err");
    const td = cell(tr, "");
    button(td, "Replay", async () => {
      const r = await api("POST", `/api/dlq/${d.seq}/replay`);
      say("replayed dead letter " + d.seq + " as task " + (r.task_id || "?"));
    }, { "data-action": "replay" });
    return tr;
  }));
}

let busy = false;
async function refresh() {
  if (!token() || busy) return;
  busy = true;
  try {
    const st = await api("GET", "/api/stats");
    renderStats(st);
    await refreshDlq();
    $("#status").textContent = "live · updated " + new Date().toLocaleTimeString();
    $("#status").className = "muted";
  } catch (e) {
    $("#status").textContent = e.status === 401 || e.status === 403 ? "sign in again: " + e.message : "error: " + e.message;
    $("#status").className = "bad";
  } finally {
    busy = false;
  }
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("taskmesh.token", $("#token").value.trim());
  $("#token").value = "";
  prev = null;
  refresh();
});
$("#logout-btn").addEventListener("click", () => {
  sessionStorage.removeItem("taskmesh.token");
  $("#status").textContent = "not signed in";
});
$("#dlq-filter").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });

setInterval(refresh, POLL_MS);
refresh();
