// The playback page of vaporproxy (GET /console/recordings/{id}#key=ADMINKEY).
//
// It fetches the recording with the admin key (moved from the URL fragment
// to sessionStorage at once, sent only in an Authorization header), parses
// the file (format version 1, see README "Recording files"), and plays it
// with the real client: noVNC for VNC, spice-html5 for SPICE.  The client
// is given fake WebSockets (playback_sockets.js), one per recorded channel,
// that deliver what the VM sent the browser at the recorded times (scaled
// by the speed) and ignore what the client sends.  Seeking replays the
// recording from the start up to the chosen point at once, into a fresh
// client, then plays on from there.
//
// The length is shown at once: the metadata's duration while the file
// loads, then the longer of it and the last record's time.  A recording
// whose console is still open (outcome LIVE) plays what has been written
// so far; at its end the page says "recording in progress — played up to
// now" (state "live", never "ended") and offers Load newer, which fetches
// only the bytes written since (playback_source.js) and plays on.
//
// State for people and tests: the status line and window.vaporPlayback.
"use strict";

import { takeFromFragment } from "./fragment.js";
import { VncChannel, spiceSocketClass } from "./playback_sockets.js";
import { RecordingSource } from "./playback_source.js";

const KEY_STORAGE = "vapor.key";
const KIND_TO_BROWSER = 0;
const KIND_CHANNEL_OPEN = 2;

const $ = (id) => document.getElementById(id);

const playback = {
  state: "init",     // init loading ready playing paused ended live failed
  type: null,        // "vnc" | "spice"
  live: false,       // the console is still being recorded (outcome LIVE)
  outcome: null,     // the metadata's outcome, when the API said
  durationMs: 0,
  loads: 0,          // fetches of the file (1, then one per Load newer)
  positionMs: 0,
  speed: 1,
  fed: 0,            // records delivered to the client since the last (re)start
  channels: 0,       // channels in the recording
  linked: 0,         // of them, mapped to a client's socket since the last (re)start
  unplayed: 0,       // at the end: records no socket of the client asked for
  seeks: 0,
  clientErrors: [],  // what the client reported (spice-html5's onerror)
  error: null,
};
window.vaporPlayback = playback;

const IN_PROGRESS = "recording in progress";

function setStatus(state, text) {
  playback.state = state;
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text || (playback.live ? `${state} (${IN_PROGRESS})` : state);
  $("more").hidden = !playback.live;
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

// -- the player ------------------------------------------------------------

// Plays one recording into one client at a time.  Each recorded channel
// has its own queue of records, played in order at their times (scaled by
// the speed) into the socket mapped to it: a channel waits for its socket
// (SPICE: opened by spice-html5 when the main channel's messages list it)
// without holding the others back.  Seeking makes a fresh client (a new
// generation of sockets) and plays everything before the point at once.
class Player {
  constructor(recording, metaMs) {
    this.header = recording.header;
    this.load(recording, metaMs);
    this.cursors = new Map();  // channel -> index of its next record
    this.generation = 0;
    this.timer = null;
    this.scheduled = false;
    this.playing = false;
    this.origin = 0;      // performance.now() when the position was `base`
    this.base = 0;
    this.sockets = [];
    this.client = null;
    this.SpiceSocket = null;
  }

  // The records to play.  A longer read of the same file (a live one that
  // grew) only appends to each channel's queue, so the cursors stay good.
  load(recording, metaMs) {
    this.queues = new Map();   // channel -> records the browser received
    this.opens = [];           // [{channel, info}] in the order channels opened
    for (const r of recording.records) {
      if (r.kind === KIND_TO_BROWSER) {
        if (!this.queues.has(r.channel)) this.queues.set(r.channel, []);
        this.queues.get(r.channel).push(r);
      } else if (r.kind === KIND_CHANNEL_OPEN) {
        let info = {};
        try { info = JSON.parse(new TextDecoder().decode(r.data)); } catch (e) { /* no info */ }
        this.opens.push({ channel: r.channel, info });
      }
    }
    this.total = recording.records.filter((r) => r.kind === KIND_TO_BROWSER).length;
    const last = recording.records.length ? recording.records[recording.records.length - 1].t : 0;
    playback.durationMs = Math.max(last, metaMs || 0);
    playback.channels = this.opens.length;
  }

  // -- what the fake sockets call ---------------------------------------

  adopt(socket) {
    this.sockets.push(socket);
  }

  // A SPICE socket sent its link message: it is the next recorded channel
  // of that type (and id) not yet taken in this generation.
  linked(socket, type, id) {
    const taken = new Set(this.sockets.map((s) => s.channel));
    const open = this.opens.find(
      (o) => o.info.channel_type === type && (o.info.channel_id ?? 0) === id && !taken.has(o.channel));
    socket.channel = open ? open.channel : -1;
    playback.linked = this.sockets.filter((s) => s.channel !== null && s.channel >= 0).length;
    this.schedule();
  }

  // Pump on a later task, never inside a client's own call.
  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    const generation = this.generation;
    setTimeout(() => {
      this.scheduled = false;
      if (generation === this.generation) this.pump();
    }, 0);
  }

  // -- the clock ----------------------------------------------------------

  position() {
    if (!this.playing) return this.base;
    return Math.min(playback.durationMs, this.base + (performance.now() - this.origin) * playback.speed);
  }

  async restart(atMs) {
    clearTimeout(this.timer);
    this.generation += 1;
    this.teardown();
    this.cursors = new Map();
    playback.fed = 0;
    playback.linked = 0;
    this.base = atMs;
    this.origin = performance.now();
    await this.makeClient();
    this.pump();
  }

  // The client first, so that it closes its own sockets and gets their
  // close event (noVNC waits for it, else logs "Disconnection timed out.").
  teardown() {
    const client = this.client;
    this.client = null;
    if (client && client.disconnect) {
      try { client.disconnect(); } catch (e) { /* already gone */ }
    }
    if (client && client.stop) {
      try { client.stop(); } catch (e) { /* already gone */ }
    }
    for (const socket of this.sockets) socket.close();
    this.sockets = [];
    $("screen").replaceChildren();
  }

  async makeClient() {
    if (this.header.type === "spice") {
      const SpiceHtml5 = await import("/static/spice-html5/main.js");
      if (this.SpiceSocket === null) {
        // For good, not for a while: spice-html5 opens its later channels
        // from inside its handlers, and this page wants no real socket.
        this.SpiceSocket = spiceSocketClass(this);
        window.WebSocket = this.SpiceSocket;
      }
      const generation = this.generation;
      this.client = new SpiceHtml5.SpiceMainConn({
        uri: "ws://recording/", screen_id: "screen", message_id: "spice-messages", password: "",
        onerror: (e) => {
          if (generation === this.generation) playback.clientErrors.push(String(e && e.message ? e.message : e));
        },
        onsuccess: () => {},
      });
    } else {
      const { default: RFB } = await import("/static/novnc/core/rfb.js");
      const channel = new VncChannel();
      this.adopt(channel);
      playback.linked = 1;
      this.client = new RFB($("screen"), channel, { shared: true });
      this.client.viewOnly = true;
      this.client.scaleViewport = true;
    }
  }

  // Deliver every due record to its channel's socket, if that is ready.
  pump() {
    clearTimeout(this.timer);
    this.timer = null;
    const generation = this.generation;
    const now = this.position();
    let due = Infinity;    // the time of the next record a ready socket waits for
    for (let i = 0; i < this.sockets.length; i += 1) {
      const socket = this.sockets[i];
      if (!socket.ready()) continue;
      const queue = this.queues.get(socket.channel) || [];
      let next = this.cursors.get(socket.channel) || 0;
      while (next < queue.length && queue[next].t <= now) {
        socket.deliver(queue[next].data);
        next += 1;
        playback.fed += 1;
        if (generation !== this.generation) return;  // the client restarted itself
      }
      this.cursors.set(socket.channel, next);
      if (next < queue.length) due = Math.min(due, queue[next].t);
    }
    playback.positionMs = now;
    showTime();
    const waiting = this.sockets.some((s) => s.pending());
    if (now >= playback.durationMs && due === Infinity && !waiting) {
      this.finish();
      return;
    }
    if (this.playing) {
      const target = Math.min(due, playback.durationMs);
      const wait = Math.max(5, (target - now) / playback.speed);
      this.timer = setTimeout(() => this.pump(), Math.min(wait, 250));
    }
  }

  finish() {
    this.playing = false;
    this.base = playback.durationMs;
    playback.positionMs = playback.durationMs;
    playback.unplayed = this.total - playback.fed;
    showTime();
    if (playback.live) setStatus("live", `${IN_PROGRESS} — played up to now; Load newer plays what was recorded since`);
    else setStatus("ended", "ended");
    $("play").textContent = "Play";
  }

  // More of the file was read (Load newer): play on from where it stopped
  // (a paused player stays paused where it is).
  extend(recording, metaMs) {
    const at = this.position();
    this.load(recording, metaMs);
    this.base = at;
    this.origin = performance.now();
    this.playing = this.playing || playback.state === "live";
    setStatus(this.playing ? "playing" : "paused");
    $("play").textContent = this.playing ? "Pause" : "Play";
    this.pump();
  }

  play() {
    if (playback.state === "ended" || playback.state === "live") {
      this.playing = true;
      setStatus("playing");
      return this.restart(0);
    }
    this.base = this.position();
    this.origin = performance.now();
    this.playing = true;
    setStatus("playing");
    this.pump();
    return Promise.resolve();
  }

  pause() {
    this.base = this.position();
    this.playing = false;
    setStatus("paused");
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
    if (playback.state === "ended" || playback.state === "live") setStatus("paused");
    return this.restart(Math.max(0, Math.min(ms, playback.durationMs)));
  }
}

function clock(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function showTime() {
  const sofar = playback.live ? " so far" : "";
  $("time").textContent = `${clock(playback.positionMs)} / ${clock(playback.durationMs)}${sofar}`;
  $("seek").max = String(playback.durationMs);
  const seek = $("seek");
  if (document.activeElement !== seek) seek.value = String(Math.floor(playback.positionMs));
}

// What the metadata says: whether the console is live, and its length in
// ms (null while it is live or when a crash cut it).
function takeMeta(meta) {
  if (!meta) return null;
  playback.outcome = meta.outcome ?? null;
  playback.live = meta.outcome === "LIVE";
  return typeof meta.duration_s === "number" ? Math.round(meta.duration_s * 1000) : null;
}

// Load newer: what a live recording wrote since the page read it.
async function loadNewer(player, source) {
  $("more").disabled = true;
  try {
    const [grew, meta] = await Promise.all([source.more(), source.meta()]);
    const metaMs = takeMeta(meta);
    playback.loads += 1;
    if (grew || metaMs !== null) player.extend(parseRecording(source.buffer), metaMs);
    else setStatus("live", `${IN_PROGRESS} — nothing newer written yet`);
  } catch (e) {
    setStatus(playback.state, `could not load newer: ${e && e.message ? e.message : e}`);
  } finally {
    $("more").disabled = false;
  }
}

async function main() {
  const id = decodeURIComponent(window.location.pathname.split("/").pop() || "");
  const source = new RecordingSource(id, takeKey());
  setStatus("loading", "loading…");
  // The length is shown as soon as the metadata says it, before the file is in.
  const metaMs = source.meta().then((meta) => {
    const ms = takeMeta(meta);
    if (ms !== null && playback.state === "loading") { playback.durationMs = ms; showTime(); }
    return ms;
  });
  let buffer;
  try {
    buffer = await source.load();
  } catch (e) {
    playback.error = e.message;
    setStatus("failed", e.message);
    return;
  }
  playback.loads = 1;
  const recording = parseRecording(buffer);
  const player = new Player(recording, await metaMs);
  playback.type = recording.header.type;
  $("title").textContent = `${recording.header.vm_name || recording.header.vm_id} · ${recording.header.user}`;
  showTime();
  for (const id of ["play", "speed", "seek"]) $(id).disabled = false;
  $("play").addEventListener("click", () => {
    if (player.playing) { player.pause(); $("play").textContent = "Play"; }
    else { player.play(); $("play").textContent = "Pause"; }
  });
  $("speed").addEventListener("change", (e) => player.setSpeed(Number(e.target.value)));
  $("seek").addEventListener("change", (e) => player.seek(Number(e.target.value)));
  $("more").addEventListener("click", () => loadNewer(player, source));
  window.vaporPlayer = player;  // tests: seek(ms), play(), pause()
  setStatus("ready");
  await player.restart(0);
  player.play();
  $("play").textContent = "Pause";
}

main().catch((e) => {
  playback.error = String(e && e.message ? e.message : e);
  setStatus("failed", playback.error);
});
