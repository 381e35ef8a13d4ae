// The playback page of vaporproxy (GET /console/recordings/{id}#key=ADMINKEY).
//
// It fetches the recording with the admin key (moved from the URL fragment
// to sessionStorage at once, sent only in an Authorization header), parses
// the file (format version 1, see README "Recording files"), and plays it
// with the real client: noVNC for VNC, spice-html5 for SPICE.  The client
// is given a fake WebSocket that delivers what the VM sent the browser at
// the recorded times (scaled by the speed) and ignores what the client
// sends.  Seeking replays the recording from the start up to the chosen
// point at once, into a fresh client, then plays on from there.
//
// State for people and tests: the status line and window.vaporPlayback.
"use strict";

import { takeFromFragment } from "./fragment.js";

const API = "/api/v1/console/recordings/";
const KEY_STORAGE = "vapor.key";
const KIND_TO_BROWSER = 0;
const KIND_CHANNEL_OPEN = 2;

const $ = (id) => document.getElementById(id);

const playback = {
  state: "init",     // init loading ready playing paused ended failed
  type: null,        // "vnc" | "spice"
  durationMs: 0,
  positionMs: 0,
  speed: 1,
  fed: 0,            // records delivered to the client since the last (re)start
  seeks: 0,
  error: null,
};
window.vaporPlayback = playback;

function setStatus(state, text) {
  playback.state = state;
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text || state;
}

const takeKey = () => takeFromFragment("key", KEY_STORAGE);

// -- the file --------------------------------------------------------------

export function parseRecording(buffer) {
  const view = new DataView(buffer);
  const magic = new TextDecoder().decode(new Uint8Array(buffer, 0, Math.min(5, buffer.byteLength)));
  if (buffer.byteLength < 10 || magic !== "VPREC") throw new Error("not a vaporproxy recording");
  const version = view.getUint8(5);
  if (version !== 1) throw new Error(`recording format version ${version} is not supported`);
  const headerLen = view.getUint32(6, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 10, headerLen)));
  const records = [];
  let pos = 10 + headerLen;
  while (buffer.byteLength - pos >= 11) {
    const kind = view.getUint8(pos);
    const channel = view.getUint16(pos + 1, true);
    const t = view.getUint32(pos + 3, true);
    const length = view.getUint32(pos + 7, true);
    if (kind > 3 || buffer.byteLength - pos - 11 < length) break;  // a cut last record
    records.push({ kind, channel, t, data: buffer.slice(pos + 11, pos + 11 + length) });
    pos += 11 + length;
  }
  return { header, records };
}

// -- fake sockets ----------------------------------------------------------

// What noVNC takes as a "raw channel": already open, sends go nowhere.
class VncChannel {
  constructor() {
    this.binaryType = "arraybuffer";
    this.protocol = "";
    this.readyState = "open";
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.onclose = null;
  }
  send() {}
  close() { this.readyState = "closed"; }
  ready() { return typeof this.onmessage === "function"; }
  deliver(data) { this.onmessage({ data }); }
}

// What spice-html5 creates with `new WebSocket(uri, "binary")`: it links
// as some channel type; the recorded channel of that type answers it.
function spiceSocketClass(player) {
  return class SpiceSocket extends EventTarget {
    constructor() {
      super();
      this.binaryType = "arraybuffer";
      this.protocol = "binary";
      this.readyState = 0;
      this.channel = null;
      player.sockets.push(this);
      setTimeout(() => { this.readyState = 1; this.dispatchEvent(new Event("open")); }, 0);
    }
    send(data) {
      if (this.channel !== null) return;
      // SpiceLinkHeader (16 bytes), then SpiceLinkMess: connection_id u32,
      // channel_type u8, channel_id u8.
      const bytes = new Uint8Array(data instanceof ArrayBuffer ? data : data.buffer || data);
      if (bytes.length >= 22) this.channel = player.channelFor(bytes[20], bytes[21]);
      player.pump();
    }
    close() { this.readyState = 3; }
    ready() { return this.channel !== null; }
    deliver(data) {
      const event = new MessageEvent("message", { data });
      this.dispatchEvent(event);
    }
  };
}

// -- the player ------------------------------------------------------------

class Player {
  constructor(recording) {
    this.header = recording.header;
    this.records = recording.records.filter((r) => r.kind === KIND_TO_BROWSER);
    this.opens = recording.records.filter((r) => r.kind === KIND_CHANNEL_OPEN);
    playback.durationMs = recording.records.length ? recording.records[recording.records.length - 1].t : 0;
    this.next = 0;
    this.timer = null;
    this.playing = false;
    this.origin = 0;      // performance.now() when positionMs was `base`
    this.base = 0;
    this.sockets = [];
    this.client = null;
  }

  // The recorded channel number a SPICE socket of this type/id is.
  channelFor(type, id) {
    const taken = new Set(this.sockets.map((s) => s.channel).filter((c) => c !== null));
    for (const open of this.opens) {
      let info = {};
      try { info = JSON.parse(new TextDecoder().decode(open.data)); } catch (e) { /* no info */ }
      if (info.channel_type === type && (info.channel_id ?? 0) === id && !taken.has(open.channel)) {
        return open.channel;
      }
    }
    return -1;  // never answered: the recording has no such channel
  }

  position() {
    if (!this.playing) return this.base;
    return Math.min(playback.durationMs, this.base + (performance.now() - this.origin) * playback.speed);
  }

  async restart(atMs) {
    clearTimeout(this.timer);
    this.teardown();
    this.next = 0;
    playback.fed = 0;
    this.base = atMs;
    this.origin = performance.now();
    await this.makeClient();
    this.pump();
  }

  teardown() {
    if (this.client && this.client.disconnect) {
      try { this.client.disconnect(); } catch (e) { /* already gone */ }
    }
    if (this.client && this.client.stop) {
      try { this.client.stop(); } catch (e) { /* already gone */ }
    }
    this.client = null;
    this.sockets = [];
    $("screen").replaceChildren();
  }

  async makeClient() {
    if (this.header.type === "spice") {
      const SpiceHtml5 = await import("/static/spice-html5/main.js");
      const RealWebSocket = window.WebSocket;
      window.WebSocket = spiceSocketClass(this);
      try {
        this.client = new SpiceHtml5.SpiceMainConn({
          uri: "ws://recording/", screen_id: "screen", message_id: "spice-messages", password: "",
          onerror: () => {}, onsuccess: () => {},
        });
      } finally {
        // spice-html5 opens its later channels from inside its handlers.
        setTimeout(() => { window.WebSocket = RealWebSocket; }, 60000);
      }
    } else {
      const { default: RFB } = await import("/static/novnc/core/rfb.js");
      const channel = new VncChannel();
      this.sockets.push(channel);
      channel.channel = 0;
      this.client = new RFB($("screen"), channel, { shared: true });
      this.client.viewOnly = true;
      this.client.scaleViewport = true;
    }
  }

  // Deliver every record that is due to a socket ready for it.
  pump() {
    clearTimeout(this.timer);
    const now = this.position();
    while (this.next < this.records.length && this.records[this.next].t <= now) {
      const record = this.records[this.next];
      const socket = this.sockets.find((s) => s.channel === record.channel);
      if (!socket || !socket.ready()) break;  // not linked yet: wait for it
      socket.deliver(record.data);
      this.next += 1;
      playback.fed += 1;
    }
    playback.positionMs = now;
    showTime();
    if (this.next >= this.records.length && now >= playback.durationMs) {
      this.playing = false;
      this.base = playback.durationMs;
      setStatus("ended", "ended");
      $("play").textContent = "Play";
      return;
    }
    if (this.playing || this.next < this.records.length) {
      const due = this.next < this.records.length ? this.records[this.next].t : playback.durationMs;
      const wait = this.playing ? Math.max(5, (due - now) / playback.speed) : 20;
      this.timer = setTimeout(() => this.pump(), Math.min(wait, 250));
    }
  }

  play() {
    if (playback.state === "ended") {
      this.playing = true;
      setStatus("playing", "playing");
      this.restart(0);
      return;
    }
    this.base = this.position();
    this.origin = performance.now();
    this.playing = true;
    setStatus("playing", "playing");
    this.pump();
  }

  pause() {
    this.base = this.position();
    this.playing = false;
    setStatus("paused", "paused");
    this.pump();
  }

  setSpeed(speed) {
    this.base = this.position();
    this.origin = performance.now();
    playback.speed = speed;
    this.pump();
  }

  seek(ms) {
    playback.seeks += 1;
    if (playback.state === "ended") setStatus("paused", "paused");
    return this.restart(Math.max(0, Math.min(ms, playback.durationMs)));
  }
}

function clock(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function showTime() {
  $("time").textContent = `${clock(playback.positionMs)} / ${clock(playback.durationMs)}`;
  const seek = $("seek");
  if (document.activeElement !== seek) seek.value = String(Math.floor(playback.positionMs));
}

async function main() {
  const id = decodeURIComponent(window.location.pathname.split("/").pop() || "");
  const key = takeKey();
  setStatus("loading", "loading…");
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(API + encodeURIComponent(id) + "/data", { headers, cache: "no-store" });
  if (!response.ok) {
    let code = `HTTP ${response.status}`;
    try { code = (await response.json()).code || code; } catch (e) { /* not JSON */ }
    playback.error = code;
    setStatus("failed", code);
    return;
  }
  const recording = parseRecording(await response.arrayBuffer());
  const player = new Player(recording);
  playback.type = recording.header.type;
  $("title").textContent = `${recording.header.vm_name || recording.header.vm_id} · ${recording.header.user}`;
  const seek = $("seek");
  seek.max = String(playback.durationMs);
  for (const id of ["play", "speed", "seek"]) $(id).disabled = false;
  $("play").addEventListener("click", () => {
    if (player.playing) { player.pause(); $("play").textContent = "Play"; }
    else { player.play(); $("play").textContent = "Pause"; }
  });
  $("speed").addEventListener("change", (e) => player.setSpeed(Number(e.target.value)));
  seek.addEventListener("change", (e) => player.seek(Number(e.target.value)));
  window.vaporPlayer = player;  // tests: seek(ms), play(), pause()
  setStatus("paused", "ready");
  await player.restart(0);
  player.play();
  $("play").textContent = "Pause";
}

main().catch((e) => {
  playback.error = String(e && e.message ? e.message : e);
  setStatus("failed", playback.error);
});
