'use strict';
// The benchmark's backend: a TCP server that plays a VNC server (a minimal
// RFB 3.8 server handshake: version, security type None, SecurityResult,
// ServerInit after ClientInit) and then runs one workload per connection,
// chosen by an 8-byte command the client sends after the handshake:
//
//   'E' ...            echo every byte back (latency, pings)
//   'S' u32 chunk      stream chunk-sized writes without end (downstream)
//   'U' ...            sink; one ack byte back per 64 KiB received (upstream)
//   3 ...              a FramebufferUpdateRequest (10 bytes): stream valid RFB
//                      FramebufferUpdates without end, one Raw 128x128
//                      rectangle (64 KiB of pixels) each (downstream).  A
//                      real RFB message each way, so consoles whose stages
//                      frame the browser's messages (view-only) or the VM's
//                      (clipboard from_vm: false) pass it.
//
// With --ws-port it also serves the same sessions over a minimal WebSocket
// server (the `ws` package): the "direct WebSocket" ceiling, no proxy.
//
// usage: node backend.js --tcp-port N [--ws-port M]
// Prints one JSON line {"ready":true,...} when listening.

const net = require('net');

const ACK_UNIT = 64 * 1024;
const STREAM_HIGH_WATER = 1 << 20;

function serverInit() {
  const name = Buffer.from('vaporproxy-bench');
  const b = Buffer.alloc(24 + name.length);
  b.writeUInt16BE(1024, 0);
  b.writeUInt16BE(768, 2);
  // pixel format: 32 bpp, depth 24, little endian, true colour, 255/255/255, 16/8/0
  Buffer.from([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]).copy(b, 4);
  b.writeUInt32BE(name.length, 20);
  name.copy(b, 24);
  return b;
}
const SERVER_INIT = serverInit();
// FramebufferUpdate: type 0, pad, 1 rectangle; x, y, 128 x 128, Raw; 128*128*4 bytes.
const RECT_SIDE = 128;
const UPDATE_HEADER = Buffer.from([0, 0, 0, 1, 0, 0, 0, 0, 0, RECT_SIDE, 0, RECT_SIDE, 0, 0, 0, 0]);
const PAYLOAD = (() => {
  const b = Buffer.alloc(1 << 20);
  for (let i = 0; i < b.length; i++) b[i] = (i * 2654435761) >>> 24;
  return b;
})();
const UPDATE = Buffer.concat([UPDATE_HEADER, PAYLOAD.subarray(0, RECT_SIDE * RECT_SIDE * 4)]);

/**
 * One backend session over an abstract byte transport:
 *   io.write(buf) -> bool (false: back off until io.onDrain fires)
 *   io.onDrain(fn), io.close()
 * Feed received bytes with session.data(buf).
 */
class Session {
  constructor(io) {
    this.io = io;
    this.buf = Buffer.alloc(0);
    this.state = 'version';
    this.mode = null;
    this.sunk = 0;
    this.closed = false;
    io.write(Buffer.from('RFB 003.008\n'));
  }

  take(n) {
    if (this.buf.length < n) return null;
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  data(chunk) {
    if (this.mode === 'E') { this.io.write(chunk); return; }
    if (this.mode === 'U') { this.sink(chunk.length); return; }
    if (this.mode === 'S' || this.mode === 'F') return;
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      if (this.state === 'version') {
        if (!this.take(12)) return;
        this.io.write(Buffer.from([1, 1]));
        this.state = 'sectype';
      } else if (this.state === 'sectype') {
        const t = this.take(1);
        if (!t) return;
        if (t[0] !== 1) { this.io.close(); return; }
        this.io.write(Buffer.from([0, 0, 0, 0]));
        this.state = 'clientinit';
      } else if (this.state === 'clientinit') {
        if (!this.take(1)) return;
        this.io.write(SERVER_INIT);
        this.state = 'command';
      } else if (this.state === 'command') {
        if (this.buf.length && this.buf[0] === 3) {
          if (!this.take(10)) return;
          this.buf = Buffer.alloc(0);
          this.start('F', 0, this.buf);
          return;
        }
        const c = this.take(8);
        if (!c) return;
        const rest = this.buf;
        this.buf = Buffer.alloc(0);
        this.start(String.fromCharCode(c[0]), c.readUInt32BE(4), rest);
        return;
      }
    }
  }

  start(mode, arg, rest) {
    this.mode = mode;
    if (mode === 'E') { if (rest.length) this.io.write(rest); }
    else if (mode === 'U') { this.sink(rest.length); }
    else if (mode === 'S' || mode === 'F') {
      const chunk = mode === 'F' ? UPDATE : PAYLOAD.subarray(0, Math.max(1, Math.min(arg || 65536, PAYLOAD.length)));
      const pump = () => {
        while (!this.closed) {
          if (!this.io.write(chunk)) { this.io.onDrain(pump); return; }
        }
      };
      pump();
    } else this.io.close();
  }

  sink(n) {
    this.sunk += n;
    if (this.sunk >= ACK_UNIT) {
      const acks = Math.floor(this.sunk / ACK_UNIT);
      this.sunk -= acks * ACK_UNIT;
      this.io.write(Buffer.alloc(acks, 0x61));
    }
  }
}

function tcpServer(port) {
  const srv = net.createServer({ noDelay: true }, (sock) => {
    sock.setNoDelay(true);
    let session;
    const io = {
      write: (b) => sock.write(b),
      onDrain: (fn) => sock.once('drain', fn),
      close: () => sock.destroy(),
    };
    sock.on('data', (d) => session.data(d));
    sock.on('error', () => {});
    sock.on('close', () => { session.closed = true; });
    session = new Session(io);
  });
  srv.maxConnections = 1 << 20;
  return new Promise((res) => srv.listen({ port, host: '127.0.0.1', backlog: 4096 }, () => res(srv)));
}

function wsServer(port) {
  const { WebSocketServer } = require('ws');
  const wss = new WebSocketServer({
    host: '127.0.0.1', port, backlog: 4096, perMessageDeflate: false,
    maxPayload: 64 << 20, clientTracking: false,
  });
  wss.on('connection', (ws) => {
    const sock = ws._socket;
    sock.setNoDelay(true);
    let session;
    const io = {
      write: (b) => { ws.send(b, { binary: true }); return ws.bufferedAmount < STREAM_HIGH_WATER; },
      onDrain: (fn) => sock.once('drain', fn),
      close: () => ws.terminate(),
    };
    ws.on('message', (d) => session.data(d));
    ws.on('error', () => {});
    ws.on('close', () => { session.closed = true; });
    session = new Session(io);
  });
  return new Promise((res) => wss.on('listening', () => res(wss)));
}

async function main() {
  const args = process.argv.slice(2);
  const opt = {};
  for (let i = 0; i < args.length; i += 2) opt[args[i].replace(/^--/, '')] = Number(args[i + 1]);
  if (!opt['tcp-port']) throw new Error('--tcp-port is required');
  await tcpServer(opt['tcp-port']);
  if (opt['ws-port']) await wsServer(opt['ws-port']);
  process.stdout.write(JSON.stringify({ ready: true, pid: process.pid }) + '\n');
}

module.exports = { Session, ACK_UNIT };
if (require.main === module) main().catch((e) => { console.error(e); process.exit(1); });
