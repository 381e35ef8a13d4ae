// The bundled console page of vaporproxy (GET /console/{id}), served as
// /static/app/console.js next to /static/app/console.css.
//
// - The VM id comes from the path (/console/<id>), the API key from the URL
//   fragment (#key=...): it is moved to sessionStorage and removed from the
//   address bar at once, and is only ever sent in an Authorization header.
// - Every (re)connect fetches a FRESH one-time token from
//   GET /api/v1/virtualization/virtualmachines/<id>/console, then opens the
//   console: noVNC for "vnc", spice-html5 for "spice".
// - The page creates the WebSockets itself (noVNC) or watches the ones
//   spice-html5 creates, so it can read the proxy's error message
//   ({"type":"error","code":...}) and the close code (4000 + n).
// - After an unexpected close it reconnects with backoff; after a fatal
//   code (VM gone, no console, not allowed, terminated, idle) it stops.
// - A share link (/console/<id>#share=SECRET) is used like the key: moved to
//   sessionStorage, sent only as "Authorization: Share SECRET"; each
//   (re)connect spends one of the share's uses.
// - ?mode=view asks for a view-only console; the proxy decides (a view-only
//   key or share always gets one) and enforces it: the page only shows it
//   (a "view only" badge; noVNC's viewOnly so no input is even tried).
// - A refusal says why: e.g. MFA_REQUIRED with the identity provider's
//   challenge, shown in the status line; a final close code with a
//   sentence a person can act on (FATAL_HINTS).
// - A key or share pasted into the fragment of an open page (a same-page
//   navigation, no reload) is taken at once and the console reconnects.
// - State for people and tests: the status line and window.vapor.
"use strict";

import { secret, takeSecrets } from "./fragment.js";

const API_PREFIX = "/api/v1/virtualization/virtualmachines/";
const KEY_STORAGE = "vapor.key";
const SHARE_STORAGE = "vapor.share";

// Close codes after which a reconnect cannot help.
const FATAL_CLOSE_CODES = new Map([
  [4004, "VM_NOT_FOUND"],
  [4005, "NO_CONSOLE_AVAILABLE"],
  [4008, "UNAUTHORIZED"],
  [4010, "SESSION_TERMINATED"],
  [4011, "IDLE_TIMEOUT"],
  [4012, "BAD_REQUEST"],
]);
// What a person can make of a final close code (the status line).
const FATAL_HINTS = new Map([
  [4004, "the VM no longer exists"],
  [4005, "the VM has no console the proxy can open"],
  [4008, "not allowed"],
  [4010, "an administrator ended this VM's consoles, or the share link or key was revoked"],
  [4011, "idle too long; press Reconnect"],
  [4012, "the proxy refused a message from this page"],
]);
// HTTP statuses of the console-info call after which we stop.
const FATAL_HTTP = new Set([400, 401, 403, 404, 409]);

const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const MAX_FAILED_ATTEMPTS = 8;

// The observable state (plain data: tests read it with JSON).
const vapor = {
  vmId: null,
  type: null,          // "vnc" | "spice" once known
  mode: null,          // "control" | "view" once known (the proxy's answer)
  state: "init",       // init fetching connecting connected reconnecting disconnected failed
  lastError: null,     // an error code name (e.g. "TOKEN_ALREADY_USED") or a short text
  errorText: null,     // the proxy's text of its last console error (e.g. "Share link revoked")
  statusText: "",      // what the status line says
  closeCode: null,     // the close code of the last closed console WebSocket
  closeReason: null,
  channels: 0,         // WebSockets of the current session that opened
  maxChannels: 0,      // the most channels seen open in one session
  tokenFetches: 0,     // console-info calls made (one per (re)connect)
  connects: 0,         // sessions that reached "connected"
  attempt: 0,          // consecutive failed attempts
  history: [],         // [{code, reason, error, text}] of every ended session
};
window.vapor = vapor;

const $ = (id) => document.getElementById(id);

function setStatus(state, text) {
  vapor.state = state;
  vapor.statusText = text || state;
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text || state;
}

function errorLabel(code, reason, error, text) {
  const name = error || reason || FATAL_CLOSE_CODES.get(code) || "";
  // 4010 closes for several reasons; the proxy's text says which one.
  const hint = (code === 4010 && text) || FATAL_HINTS.get(code);
  if (code && name && hint) return `${hint} (${name}, ${code})`;
  if (code && name) return `${name} (${code})`;
  if (code) return `close code ${code}`;
  return name || "connection lost";
}

// --- inputs ---------------------------------------------------------------

function vmIdFromPath(pathname) {
  const marker = "/console/";
  const at = pathname.indexOf(marker);
  if (at < 0) return null;
  let rest = pathname.slice(at + marker.length).replace(/\/+$/, "");
  if (!rest || rest.includes("/")) return null;
  try {
    return decodeURIComponent(rest);
  } catch (e) {
    return null;
  }
}

// Strips the key or share from the address bar (history, bookmarks,
// screenshots) into this tab's storage; whether one was there.
const takeKeyFromFragment = () => takeSecrets({ key: KEY_STORAGE, share: SHARE_STORAGE });
const apiKey = () => secret(KEY_STORAGE);
const shareSecret = () => secret(SHARE_STORAGE);

function consoleInfoUrl() {
  const page = new URLSearchParams(window.location.search);
  const q = new URLSearchParams();
  for (const name of ["type", "display", "mode"]) {
    const v = page.get(name);
    if (v !== null && v !== "") q.set(name, v);
  }
  const qs = q.toString();
  return API_PREFIX + encodeURIComponent(vapor.vmId) + "/console" + (qs ? "?" + qs : "");
}

function wsUrl(info) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${info.ws_path}?token=${encodeURIComponent(info.token)}`;
}

// --- one session ----------------------------------------------------------

let session = null;        // {id, stop(), sendCtrlAltDel()}
let sessionCounter = 0;
let retryTimer = null;
let userStopped = false;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.detail = message || null;
  }
}

// The error_description of an RFC 9470 challenge (step-up refusals).
function challengeDescription(header) {
  const match = /error_description="([^"]*)"/.exec(header || "");
  return match ? match[1] : null;
}

async function fetchConsoleInfo() {
  vapor.tokenFetches += 1;
  const headers = { Accept: "application/json" };
  const share = shareSecret();
  const key = apiKey();
  if (share) headers.Authorization = "Share " + share;
  else if (key) headers.Authorization = "Bearer " + key;
  const res = await fetch(consoleInfoUrl(), {
    headers,
    cache: "no-store",
    credentials: "same-origin",
    referrerPolicy: "no-referrer",
  });
  let body = null;
  try {
    body = await res.json();
  } catch (e) {
    body = null;
  }
  if (!res.ok) {
    const code = body && body.code ? body.code : null;
    const why = challengeDescription(res.headers.get("www-authenticate"));
    throw new ApiError(res.status, code, why || (body && body.error));
  }
  if (!body || !body.token || !body.ws_path || !body.type) {
    throw new ApiError(res.status, "INTERNAL_ERROR", "malformed console info");
  }
  return body;
}

// Watch one console WebSocket: its opening, the proxy's error message and
// its close code.  `onClose` runs once, after the state is recorded.
function watchSocket(ws, sid, onClose) {
  ws.addEventListener("open", () => {
    if (sid !== sessionCounter) return;
    vapor.channels += 1;
    vapor.maxChannels = Math.max(vapor.maxChannels, vapor.channels);
  });
  ws.addEventListener("message", (e) => {
    if (typeof e.data !== "string") return;
    try {
      const msg = JSON.parse(e.data);
      if (msg && msg.type === "error" && sid === sessionCounter) {
        vapor.lastError = msg.code || "error";
        vapor.errorText = typeof msg.error === "string" ? msg.error : null;
      }
    } catch (err) {
      // not ours; ignore
    }
  });
  ws.addEventListener("close", (e) => {
    if (sid !== sessionCounter) return;
    if (e.code >= 4000 || vapor.closeCode === null || vapor.closeCode < 4000) {
      vapor.closeCode = e.code;
      vapor.closeReason = e.reason || null;
      if (e.code >= 4000 && e.reason) vapor.lastError = e.reason;
    }
    if (onClose) onClose(e);
  });
}

async function startVnc(info, sid) {
  const { default: RFB } = await import("/static/novnc/core/rfb.js");
  if (sid !== sessionCounter) return;
  // noVNC sends no subprotocol; the proxy works with none.
  const ws = new WebSocket(wsUrl(info));
  let ended = false;
  const end = (code, reason) => {
    if (ended) return;
    ended = true;
    sessionEnded(sid, code, reason);
  };
  watchSocket(ws, sid, (e) => end(e.code, e.reason));
  const rfb = new RFB($("screen"), ws, { shared: true });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.viewOnly = info.mode === "view";
  rfb.addEventListener("connect", () => {
    if (sid !== sessionCounter) return;
    sessionConnected();
    rfb.focus();
  });
  rfb.addEventListener("desktopname", (e) => {
    $("title").textContent = e.detail.name || vapor.vmId;
  });
  rfb.addEventListener("credentialsrequired", () => {
    // The proxy does the VNC security handshake; it never asks the browser.
    vapor.lastError = "CREDENTIALS_REQUESTED";
    rfb.disconnect();
  });
  rfb.addEventListener("securityfailure", (e) => {
    vapor.lastError = "SECURITY_FAILURE";
  });
  rfb.addEventListener("disconnect", () => {
    // The WebSocket's close event normally got here first; this covers a
    // protocol failure inside noVNC.
    window.setTimeout(() => end(vapor.closeCode, vapor.closeReason), 0);
  });
  session = {
    id: sid,
    stop: () => {
      ended = true;
      try { rfb.disconnect(); } catch (e) { /* already gone */ }
    },
    sendCtrlAltDel: () => rfb.sendCtrlAltDel(),
  };
}

// spice-html5 creates its WebSockets itself (one per channel, all to the
// same URL, subprotocol "binary").  While a SPICE session runs, the page's
// WebSocket constructor is a subclass that registers every socket with
// watchSocket() and keeps the proxy's JSON error text out of spice-html5's
// binary wire reader.
const NativeWebSocket = window.WebSocket;

function installSpiceSocketHook(sid, onClose) {
  class WatchedWebSocket extends NativeWebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      watchSocket(this, sid, onClose);
    }
    addEventListener(type, listener, options) {
      if (type === "message" && typeof listener === "function") {
        const inner = listener;
        listener = function (e) {
          if (typeof e.data === "string") return;
          return inner.call(this, e);
        };
      }
      return super.addEventListener(type, listener, options);
    }
  }
  window.WebSocket = WatchedWebSocket;
}

async function startSpice(info, sid) {
  const SpiceHtml5 = await import("/static/spice-html5/main.js");
  if (sid !== sessionCounter) return;
  let ended = false;
  let sc = null;
  const end = (code, reason) => {
    if (ended) return;
    ended = true;
    window.WebSocket = NativeWebSocket;
    if (sc) {
      try { sc.stop(); } catch (e) { /* already gone */ }
    }
    sessionEnded(sid, code, reason);
  };
  installSpiceSocketHook(sid, (e) => {
    // Any channel closing with a proxy error ends the session; so does the
    // main channel closing for any reason (listener below).  A view-only
    // console's inputs channel is refused (4008) by design: not an end.
    if (info.mode === "view" && e.code === 4008 && e.target !== sc.ws) {
      vapor.refusedChannels = (vapor.refusedChannels || 0) + 1;
      return;
    }
    if (e.code >= 4000) end(e.code, e.reason);
  });
  sc = new SpiceHtml5.SpiceMainConn({
    uri: wsUrl(info),
    screen_id: "screen",
    message_id: "spice-messages",
    // The proxy replaces the ticket with the VM's real password.
    password: "",
    onerror: (err) => {
      // Let a pending close event deliver its code first.
      window.setTimeout(() => end(vapor.closeCode, vapor.closeReason || (err && err.message)), 0);
    },
    onsuccess: () => {
      if (sid === sessionCounter) sessionConnected();
    },
  });
  // Only the main channel's socket exists now; later channels are created
  // by spice-html5 as the main channel lists them.
  const mainWs = sc.ws;
  if (mainWs) {
    mainWs.addEventListener("close", (e) => end(e.code, e.reason));
  }
  session = {
    id: sid,
    stop: () => {
      ended = true;
      window.WebSocket = NativeWebSocket;
      try { sc.stop(); } catch (e) { /* already gone */ }
    },
    sendCtrlAltDel: () => SpiceHtml5.sendCtrlAltDel(sc),
  };
}

// --- lifecycle ------------------------------------------------------------

function clearScreen() {
  const screen = $("screen");
  while (screen.firstChild) screen.removeChild(screen.firstChild);
}

function setButtons(connected) {
  // A view console's keys never reach the VM: no Ctrl+Alt+Del either.
  $("cad").disabled = !connected || vapor.mode === "view";
  $("disconnect").disabled = !(connected || vapor.state === "reconnecting" || vapor.state === "connecting");
  $("reconnect").disabled = connected;
}

async function connect() {
  window.clearTimeout(retryTimer);
  retryTimer = null;
  if (session) {
    session.stop();
    session = null;
  }
  userStopped = false;
  const sid = ++sessionCounter;
  vapor.channels = 0;
  vapor.closeCode = null;
  vapor.closeReason = null;
  vapor.errorText = null;
  setStatus("fetching", "requesting a console token…");
  setButtons(false);
  let info;
  try {
    info = await fetchConsoleInfo();
  } catch (e) {
    if (sid !== sessionCounter) return;
    const name = e.code || (e.status ? `HTTP ${e.status}` : "NETWORK_ERROR");
    vapor.lastError = name;
    vapor.history.push({ code: null, reason: null, error: name, http: e.status || null });
    if (e.status && FATAL_HTTP.has(e.status)) {
      let detail = e.detail && e.detail !== name ? `: ${e.detail}` : "";
      if (e.status === 401 && !apiKey() && !shareSecret()) {
        detail = ": no key; open this page as /console/<VM>#key=YOUR_KEY (or a share link)";
      }
      fail(`${name}${e.status ? " (HTTP " + e.status + ")" : ""}${detail}`);
    } else {
      scheduleReconnect(name);
    }
    return;
  }
  if (sid !== sessionCounter) return;
  vapor.type = info.type;
  vapor.mode = info.mode || "control";
  $("mode").hidden = vapor.mode !== "view";
  clearScreen();
  setStatus("connecting", `connecting (${info.type.toUpperCase()})…`);
  setButtons(false);
  try {
    if (info.type === "vnc") {
      await startVnc(info, sid);
    } else if (info.type === "spice") {
      await startSpice(info, sid);
    } else {
      fail(`unsupported console type ${info.type}`);
    }
  } catch (e) {
    if (sid !== sessionCounter) return;
    vapor.lastError = String(e && e.message ? e.message : e);
    scheduleReconnect(vapor.lastError);
  }
}

function sessionConnected() {
  vapor.connects += 1;
  vapor.attempt = 0;
  vapor.lastError = null;
  setStatus("connected", `connected (${vapor.type.toUpperCase()})`);
  setButtons(true);
}

function sessionEnded(sid, code, reason) {
  if (sid !== sessionCounter) return;
  const error = code >= 4000 ? vapor.lastError : null;
  const text = code >= 4000 ? vapor.errorText : null;
  vapor.history.push({ code: code || null, reason: reason || null, error, text });
  session = null;
  if (userStopped) {
    setStatus("disconnected", "disconnected");
    setButtons(false);
    return;
  }
  const label = errorLabel(code, reason, error, text);
  if (code === 1001) {
    // The proxy is shutting down or restarting: come back later.
    scheduleReconnect("proxy going away (1001)");
  } else if (FATAL_CLOSE_CODES.has(code)) {
    fail(label);
  } else {
    scheduleReconnect(label);
  }
}

function fail(text) {
  window.clearTimeout(retryTimer);
  retryTimer = null;
  setStatus("failed", "closed: " + text);
  setButtons(false);
}

function scheduleReconnect(why) {
  vapor.attempt += 1;
  if (vapor.attempt > MAX_FAILED_ATTEMPTS) {
    fail(`${why}; gave up after ${MAX_FAILED_ATTEMPTS} attempts`);
    return;
  }
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (vapor.attempt - 1));
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  setStatus("reconnecting", `closed: ${why}; reconnecting in ${Math.ceil(delay / 1000)} s…`);
  setButtons(false);
  retryTimer = window.setTimeout(connect, delay);
}

function disconnect() {
  userStopped = true;
  window.clearTimeout(retryTimer);
  retryTimer = null;
  if (session) {
    const s = session;
    session = null;
    s.stop();
  }
  sessionCounter += 1;
  setStatus("disconnected", "disconnected");
  setButtons(false);
}

// --- sound ----------------------------------------------------------------

// spice-html5 plays a SPICE console's sound through an <audio> element it
// adds under #screen when the VM opens a playback channel.  The Mute button
// appears with the first one and mutes every one (later ones too).
vapor.audio = { elements: 0, muted: false };
// Seconds of sound the browser has buffered from the playback channel (the
// Opus it decoded), read by tests through window.vapor.
Object.defineProperty(vapor.audio, "bufferedSeconds", {
  enumerable: true,
  get() {
    let total = 0;
    for (const audio of $("screen").querySelectorAll("audio")) {
      for (let i = 0; i < audio.buffered.length; i++) total += audio.buffered.end(i) - audio.buffered.start(i);
    }
    return total;
  },
});

function applyMute() {
  for (const audio of $("screen").querySelectorAll("audio")) audio.muted = vapor.audio.muted;
  const button = $("mute");
  button.textContent = vapor.audio.muted ? "Unmute" : "Mute";
  button.setAttribute("aria-pressed", String(vapor.audio.muted));
}

function watchAudio() {
  new MutationObserver(() => {
    const count = $("screen").querySelectorAll("audio").length;
    if (count > vapor.audio.elements) vapor.audio.elements = count;
    $("mute").hidden = vapor.audio.elements === 0;
    applyMute();
  }).observe($("screen"), { childList: true, subtree: true });
  $("mute").addEventListener("click", () => {
    vapor.audio.muted = !vapor.audio.muted;
    applyMute();
  });
}

// --- start ----------------------------------------------------------------

function main() {
  takeKeyFromFragment();
  // A key pasted into this page's address bar does not reload it.
  window.addEventListener("hashchange", () => {
    if (!takeKeyFromFragment() || !vapor.vmId) return;
    vapor.attempt = 0;
    connect();
  });
  watchAudio();
  vapor.vmId = vmIdFromPath(window.location.pathname);
  $("reconnect").addEventListener("click", () => {
    vapor.attempt = 0;
    connect();
  });
  $("disconnect").addEventListener("click", disconnect);
  $("cad").addEventListener("click", () => {
    if (session) session.sendCtrlAltDel();
  });
  if (!vapor.vmId) {
    fail("no virtual machine in the address (expected /console/<id>)");
    return;
  }
  $("title").textContent = vapor.vmId;
  document.title = `${vapor.vmId} — console`;
  window.vaporControl = { connect, disconnect };
  connect();
}

main();
