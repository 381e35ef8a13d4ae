// The control room of vaporproxy (GET /admin#key=ADMINKEY).
//
// Every few seconds it reads the live consoles (GET /api/v1/console/stats),
// the share links of the VMs it sees and the recordings, and shows them:
// who is on which VM, for how long, how many bytes each way and at what
// rate now (from the change since the last refresh).  A button per VM
// closes all of its consoles (DELETE …/{id}/console/sessions); a watch link
// opens a view-only console of that VM; each recording links to its
// playback page (both in a new tab, which gets the key in its fragment: a
// tab's sessionStorage is its own).  The key moves from the URL
// fragment to sessionStorage at once and is only sent in an Authorization
// header.  State for people and tests: window.vaporAdmin.
"use strict";

import { takeFromFragment } from "./fragment.js";

const KEY_STORAGE = "vapor.key";
const REFRESH_MS = 3000;
const VM_PATH = "/api/v1/virtualization/virtualmachines/";

const $ = (id) => document.getElementById(id);
const admin = {
  state: "init",     // init ok failed
  refreshes: 0,
  consoles: [],
  recordings: null,  // null: the server has no recordings API
  shares: null,      // null: the server has no share links API
  terminated: [],
  error: null,
};
window.vaporAdmin = admin;

const takeKey = () => takeFromFragment("key", KEY_STORAGE);

const key = takeKey();
const headers = () => (key ? { Authorization: `Bearer ${key}` } : {});
// The key travels in the fragment only: never to the server in a URL.
const keyFragment = () => `#key=${encodeURIComponent(key || "")}`;

async function api(method, path) {
  const response = await fetch(path, { method, headers: headers(), cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  return { status: response.status, body };
}

function setStatus(state, text) {
  admin.state = state;
  const el = $("status");
  el.dataset.state = state === "ok" ? "connected" : state;
  el.textContent = text;
}

function cell(row, text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  row.appendChild(td);
  return td;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.floor(s);
  return `${Math.floor(s / 3600)}:${String(Math.floor(s / 60) % 60).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

let previous = new Map();  // console_id -> {at, sent}

function showConsoles(list) {
  const now = performance.now();
  const body = $("consoles").tBodies[0];
  body.replaceChildren();
  const seen = new Map();
  for (const c of list) {
    const before = previous.get(c.console_id);
    const rate = before ? Math.max(0, (c.bytes_sent - before.sent) / ((now - before.at) / 1000)) : null;
    seen.set(c.console_id, { at: now, sent: c.bytes_sent });
    c.rate = rate;
    const row = body.insertRow();
    row.dataset.vm = c.vm_id;
    // A console opened through a share link runs as the share's creator.
    cell(row, c.share_id ? `${c.user} via share ${c.share_id}` : c.user);
    cell(row, c.vm_name || c.vm_id);
    cell(row, c.type);
    cell(row, c.mode || "control");
    cell(row, c.client || "–");
    cell(row, duration(c.duration_s), true);
    cell(row, bytes(c.bytes_sent), true);
    cell(row, bytes(c.bytes_received), true);
    cell(row, rate === null ? "–" : `${bytes(rate)}/s`, true);
    const actions = cell(row, "");
    const stop = document.createElement("button");
    stop.type = "button";
    stop.textContent = "Terminate VM's consoles";
    stop.addEventListener("click", () => terminate(c.vm_id));
    actions.appendChild(stop);
    const watch = document.createElement("a");
    watch.className = "button";
    watch.textContent = "Watch";
    watch.title = "Open a view-only console of this VM in a new tab";
    watch.href = `/console/${encodeURIComponent(c.vm_id)}?mode=view${keyFragment()}`;
    watch.target = "_blank";
    watch.rel = "noopener";
    actions.appendChild(watch);
  }
  previous = seen;
  $("no-consoles").hidden = list.length > 0;
}

function showRecordings(list) {
  $("recordings-section").hidden = list === null;
  if (list === null) return;
  const body = $("recordings").tBodies[0];
  body.replaceChildren();
  for (const r of list.slice().reverse()) {
    const row = body.insertRow();
    cell(row, r.started_at);
    cell(row, r.user);
    cell(row, r.vm_name || r.vm_id);
    cell(row, r.type);
    cell(row, duration(r.duration_s), true);
    // A recording dropped (disk full or slow) or cut by a crash says so.
    cell(row, (r.outcome || "–") + (r.complete === false ? " · incomplete" : "")).title = r.dropped || "";
    cell(row, bytes(r.size), true);
    const link = document.createElement("a");
    link.className = "button";
    link.textContent = "Play";
    link.href = `/console/recordings/${encodeURIComponent(r.id)}${keyFragment()}`;
    link.target = "_blank";
    link.rel = "noopener";
    cell(row, "").appendChild(link);
  }
}

function showShares(list) {
  $("shares-section").hidden = list === null;
  if (list === null) return;
  const body = $("shares").tBodies[0];
  body.replaceChildren();
  const names = new Map(admin.consoles.map((c) => [c.vm_id, c.vm_name]));
  for (const s of list) {
    const row = body.insertRow();
    cell(row, names.get(s.vm_id) || s.vm_id);
    cell(row, s.mode);
    cell(row, s.creator);
    cell(row, String(s.uses_left), true);
    cell(row, s.expires_at);
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.textContent = "Revoke";
    revoke.addEventListener("click", async () => {
      await api("DELETE", `${VM_PATH}${encodeURIComponent(s.vm_id)}/console/shares/${encodeURIComponent(s.share_id)}`);
      refresh();
    });
    cell(row, "").appendChild(revoke);
  }
}

async function terminate(vmId) {
  const { status, body } = await api("DELETE", `${VM_PATH}${encodeURIComponent(vmId)}/console/sessions`);
  admin.terminated.push({ vm: vmId, status, terminated: body && body.terminated });
  refresh();
}

async function sharesOf(vmIds) {
  const all = [];
  for (const vm of vmIds) {
    const { status, body } = await api("GET", `${VM_PATH}${encodeURIComponent(vm)}/console/shares`);
    if (status === 404 || status === 405) return null;  // no share links API on this server
    if (status === 200 && body && Array.isArray(body.shares)) all.push(...body.shares);
  }
  return all;
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  try {
    const stats = await api("GET", "/api/v1/console/stats");
    if (stats.status !== 200) {
      admin.error = (stats.body && stats.body.code) || `HTTP ${stats.status}`;
      setStatus("failed", admin.error);
      return;  // a wrong key does not poll on
    }
    admin.consoles = stats.body.connections || [];
    showConsoles(admin.consoles);
    $("totals").textContent = `${stats.body.total_connections} console(s), ${stats.body.total_tokens} token(s)`;
    const recordings = await api("GET", "/api/v1/console/recordings");
    admin.recordings = recordings.status === 200 ? recordings.body.recordings : null;
    showRecordings(admin.recordings);
    admin.shares = await sharesOf([...new Set(admin.consoles.map((c) => c.vm_id))]);
    showShares(admin.shares);
    admin.refreshes += 1;
    admin.error = null;
    setStatus("ok", `updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    admin.error = String(e);
    setStatus("failed", admin.error);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

refresh();
