// The fake WebSockets through which the playback page feeds a recording to
// the real clients (README "Recording files").  They never touch the
// network: what a client sends is ignored (SPICE: but for its link
// message, which says which channel the socket is), and the player hands
// them the recorded bytes with deliver().
"use strict";

// What noVNC takes as a "raw channel": already open, sends go nowhere.
// Ready once noVNC has attached its message handler.
export class VncChannel {
  constructor() {
    this.binaryType = "arraybuffer";
    this.protocol = "";
    this.readyState = "open";
    this.channel = 0;
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.onclose = null;
  }
  send() {}
  // Closes as a real socket does: the close event on a later task (noVNC,
  // disconnecting, waits for it, and logs "Disconnection timed out." if none).
  close() {
    if (this.readyState === "closed") return;
    this.readyState = "closed";
    setTimeout(() => {
      if (typeof this.onclose === "function") this.onclose({ code: 1000, reason: "", wasClean: true });
    }, 0);
  }
  ready() { return typeof this.onmessage === "function" && this.readyState === "open"; }
  pending() { return false; }
  deliver(data) { this.onmessage({ data }); }
}

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 3;
// SpiceLinkHeader (magic "REDQ", major, minor, size: 16 bytes), then
// SpiceLinkMess: connection_id u32, channel_type u8, channel_id u8.
const LINK_TYPE_AT = 20;
const LINK_ID_AT = 21;

function bytesOf(data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return new Uint8Array(0);
}

// The WebSocket class spice-html5 gets while a SPICE recording plays (the
// page installs it once, for good: the page needs no real WebSocket).
// spice-html5 creates one socket per channel, the main one first and the
// others as the main channel's recorded messages list them.  A socket
// opens (its "open" event) on the next task, as a real one would; on
// "open" spice-html5 sends its link message, and the player maps the
// socket to the next recorded channel of that type.  The player delivers
// recorded bytes only to a socket that is open and mapped, and never from
// inside send() (spice-html5 sends its link message before it is ready to
// read the answer).
//
// `player` has: generation (a seek makes a new client: sockets of an older
// generation are dead), adopt(socket), linked(socket, type, id).
export function spiceSocketClass(player) {
  return class SpiceSocket extends EventTarget {
    constructor(url, protocols) {
      super();
      this.url = String(url);
      this.protocol = Array.isArray(protocols) ? protocols[0] || "" : protocols || "";
      this.binaryType = "arraybuffer";
      this.bufferedAmount = 0;
      this.readyState = CONNECTING;
      this.channel = null;       // the recorded channel; -1: none of that type
      this.channelType = null;
      this.generation = player.generation;
      player.adopt(this);
      setTimeout(() => {
        if (this.readyState !== CONNECTING || this.generation !== player.generation) return;
        this.readyState = OPEN;
        this.dispatchEvent(new Event("open"));
      }, 0);
    }
    send(data) {
      if (this.channel !== null || this.readyState !== OPEN || this.generation !== player.generation) return;
      const bytes = bytesOf(data);
      if (bytes.length <= LINK_ID_AT) return;
      this.channelType = bytes[LINK_TYPE_AT];
      player.linked(this, bytes[LINK_TYPE_AT], bytes[LINK_ID_AT]);
    }
    close() {
      if (this.readyState === CLOSED) return;
      this.readyState = CLOSED;
    }
    // Open and mapped to a recorded channel: recorded bytes may flow.
    ready() { return this.readyState === OPEN && this.channel !== null && this.channel >= 0; }
    // Created but not yet mapped: the player waits for it before it ends.
    pending() { return this.readyState !== CLOSED && this.channel === null; }
    deliver(data) { this.dispatchEvent(new MessageEvent("message", { data })); }
  };
}
