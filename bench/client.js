'use strict';
// The benchmark's client: plays the browser.  One workload per invocation;
// the job is a JSON object in argv[2]; the result is one JSON line on stdout.
//
// target: {kind: "tcp"|"ws"|"vapor", host, port, vm?, apiKey?}
//   tcp    raw TCP (the backend directly, or socat)
//   ws     WebSocket to ws://host:port/ (websockify, the direct WS server)
//   vapor  the browser's way: GET /api/v1/virtualization/virtualmachines/{vm}/console
//          with a Bearer key, then the WebSocket at ws_path?token=...
// Every connection then does the client side of an RFB 3.8 handshake
// (version, security None, SecurityResult, ClientInit, ServerInit) and sends
// an 8-byte workload command (see backend.js).

const net = require('net');
const http = require('http');
const fs = require('fs');
const WebSocket = require('ws');

const ACK_UNIT = 64 * 1024;
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function getConsole(t) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: t.host, port: t.port, agent, method: 'GET',
      path: `/api/v1/virtualization/virtualmachines/${encodeURIComponent(t.vm)}/console`,
      headers: { Authorization: `Bearer ${t.apiKey}` },
    }, (res) => {
      const parts = [];
      res.on('data', (d) => parts.push(d));
      res.on('end', () => {
        const body = Buffer.concat(parts).toString();
        if (res.statusCode !== 200) return reject(new Error(`console info ${res.statusCode} ${body.slice(0, 200)}`));
        try { resolve(JSON.parse(body)); } catch (e) { reject(e); }
      });
    });
    req.on('error', reject);
    req.setTimeout(30000, () => req.destroy(new Error('console info timeout')));
    req.end();
  });
}

/** A byte-stream connection with a uniform face over TCP and WebSocket. */
class Conn {
  constructor() {
    this.buf = [];
    this.buffered = 0;
    this.want = null; // {n, resolve}
    this.ondata = null; // raw mode after the handshake
    this.closed = false;
    this.onclose = null;
    this.error = null;
  }

  feed(d) {
    if (this.ondata) { this.ondata(d); return; }
    this.buf.push(d);
    this.buffered += d.length;
    this.satisfy();
  }

  satisfy() {
    if (!this.want || this.buffered < this.want.n) return;
    const all = Buffer.concat(this.buf);
    const { n, resolve } = this.want;
    this.want = null;
    const rest = all.subarray(n);
    this.buf = rest.length ? [rest] : [];
    this.buffered = rest.length;
    resolve(all.subarray(0, n));
  }

  read(n) {
    if (this.closed && this.buffered < n) return Promise.reject(this.error || new Error('closed'));
    return new Promise((resolve, reject) => { this.want = { n, resolve, reject }; this.satisfy(); });
  }

  died(err) {
    if (this.closed) return;
    this.closed = true;
    this.error = err || new Error('closed by peer');
    if (this.want) { const w = this.want; this.want = null; w.reject(this.error); }
    if (this.onclose) this.onclose(this.error);
  }

  /** Switch to raw mode: fn(buf) gets every later chunk (and what is buffered). */
  raw(fn) {
    this.ondata = fn;
    if (this.buffered) { const b = Buffer.concat(this.buf); this.buf = []; this.buffered = 0; fn(b); }
  }
}

class TcpConn extends Conn {
  open(t) {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: t.host, port: t.port, noDelay: true });
      this.sock = s;
      s.on('connect', () => resolve(this));
      s.on('data', (d) => this.feed(d));
      s.on('error', (e) => { reject(e); this.died(e); });
      s.on('close', () => this.died());
    });
  }
  write(b) { return this.sock.write(b); }
  get pending() { return this.sock.writableLength; }
  onDrain(fn) { this.sock.once('drain', fn); }
  pauseReading() { this.sock.pause(); }
  close() { this.closed = true; this.sock.destroy(); }
}

class WsConn extends Conn {
  async open(t) {
    let url = `ws://${t.host}:${t.port}/`;
    if (t.kind === 'vapor') {
      const info = await getConsole(t);
      url = `ws://${t.host}:${t.port}${info.ws_path}?token=${info.token}`;
    }
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, t.protocols || [], { perMessageDeflate: false, maxPayload: 64 << 20, handshakeTimeout: 30000 });
      this.ws = ws;
      ws.binaryType = 'nodebuffer';
      ws.on('open', () => { ws._socket.setNoDelay(true); resolve(this); });
      ws.on('message', (d, isBinary) => {
        if (!isBinary) { this.text = String(d); return; }
        this.feed(d);
      });
      ws.on('unexpected-response', (req, res) => { const e = new Error(`ws upgrade ${res.statusCode}`); reject(e); this.died(e); });
      ws.on('error', (e) => { reject(e); this.died(e); });
      ws.on('close', (code, reason) => this.died(new Error(`ws closed ${code} ${reason} ${this.text || ''}`.trim())));
    });
  }
  write(b) { this.ws.send(b, { binary: true }); return this.ws.bufferedAmount < (1 << 20); }
  get pending() { return this.ws.bufferedAmount; }
  onDrain(fn) { this.ws._socket.once('drain', fn); }
  pauseReading() { this.ws.pause(); }
  close() { this.closed = true; try { this.ws.terminate(); } catch (e) { /* gone */ } }
}

// ---- the set-up path without the ws library ----
// Setup workloads open thousands of short-lived consoles; the ws library's
// per-connection machinery (http.request, its upgrade handling, a Receiver
// and a Sender per socket) costs the client more CPU than the proxy under
// test spends, on the core it shares with the backend.  For those the
// client speaks the same protocol by hand over net sockets: the info GET
// with the Bearer key on a keep-alive connection, then the upgrade request
// with the token (a random Sec-WebSocket-Key, the accept value checked),
// masked client frames (a fresh random mask per frame), unmasked server
// frames parsed.  Exactly the browser's sequence, fewer objects.

const crypto = require('crypto');
let maskBuffer = null;
try { maskBuffer = require('bufferutil').mask; } catch (e) { /* pure JS below */ }
const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

/** One keep-alive HTTP/1.1 connection for console-info GETs (one per worker). */
class InfoConn {
  constructor(t) { this.t = t; this.sock = null; this.buf = Buffer.alloc(0); this.waiting = null; }

  connect() {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: this.t.host, port: this.t.port, noDelay: true });
      s.once('connect', () => { this.sock = s; resolve(); });
      s.on('data', (d) => { this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d; this.parse(); });
      const dead = (e) => {
        if (this.sock === s) this.sock = null;
        if (this.waiting) { const w = this.waiting; this.waiting = null; w.reject(e || new Error('info connection closed')); }
        reject(e || new Error('info connection closed'));
      };
      s.on('error', dead);
      s.on('close', () => dead());
    });
  }

  parse() {
    if (!this.waiting) return;
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    const head = this.buf.toString('latin1', 0, end);
    const status = Number(head.slice(9, 12));
    const m = /\r\ncontent-length:\s*(\d+)/i.exec(head);
    let body; let used;
    if (m) {
      const n = Number(m[1]);
      if (this.buf.length < end + 4 + n) return;
      body = this.buf.subarray(end + 4, end + 4 + n); used = end + 4 + n;
    } else if (/\r\ntransfer-encoding:\s*chunked/i.test(head)) {
      const parts = []; let pos = end + 4;
      for (;;) {
        const eol = this.buf.indexOf('\r\n', pos);
        if (eol < 0) return;
        const size = parseInt(this.buf.toString('latin1', pos, eol), 16);
        if (this.buf.length < eol + 2 + size + 2) return;
        if (size === 0) { used = eol + 4; break; }
        parts.push(this.buf.subarray(eol + 2, eol + 2 + size)); pos = eol + 2 + size + 2;
      }
      body = Buffer.concat(parts);
    } else { this.waiting.reject(new Error('console info without a length')); this.waiting = null; return; }
    this.buf = this.buf.subarray(used);
    const w = this.waiting; this.waiting = null;
    w.resolve({ status, body: body.toString() });
  }

  async get(path, headers) {
    if (!this.sock) await this.connect();
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject };
      this.sock.write(`GET ${path} HTTP/1.1\r\nHost: ${this.t.host}:${this.t.port}\r\n${headers}\r\n`);
    });
  }
}

async function getConsoleRaw(t, info) {
  const path = `/api/v1/virtualization/virtualmachines/${encodeURIComponent(t.vm)}/console`;
  const { status, body } = await info.get(path, `Authorization: Bearer ${t.apiKey}\r\n`);
  if (status !== 200) throw new Error(`console info ${status} ${body.slice(0, 200)}`);
  return JSON.parse(body);
}

/** A WebSocket client over a net socket, with the Conn face. */
class RawWsConn extends Conn {
  async open(t, info) {
    let path = '/';
    if (t.kind === 'vapor') {
      const ci = await getConsoleRaw(t, info);
      path = `${ci.ws_path}?token=${ci.token}`;
    }
    const key = crypto.randomBytes(16).toString('base64');
    const accept = crypto.createHash('sha1').update(key + WS_GUID).digest('base64');
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: t.host, port: t.port, noDelay: true });
      this.sock = s;
      let head = null; let rest = null;
      s.on('connect', () => {
        s.write(`GET ${path} HTTP/1.1\r\nHost: ${t.host}:${t.port}\r\nUpgrade: websocket\r\n`
          + `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
      });
      s.on('data', (d) => {
        if (head !== null) { this.frames(d); return; }
        rest = rest ? Buffer.concat([rest, d]) : d;
        const end = rest.indexOf('\r\n\r\n');
        if (end < 0) return;
        head = rest.toString('latin1', 0, end);
        const after = rest.subarray(end + 4); rest = null;
        if (!head.startsWith('HTTP/1.1 101')) {
          const e = new Error(`ws upgrade ${head.slice(9, 12)}`); reject(e); this.died(e); s.destroy(); return;
        }
        const m = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(head);
        if (!m || m[1] !== accept) {
          const e = new Error('ws upgrade: bad Sec-WebSocket-Accept'); reject(e); this.died(e); s.destroy(); return;
        }
        resolve(this);
        if (after.length) this.frames(after);
      });
      s.on('error', (e) => { reject(e); this.died(e); });
      s.on('close', () => { reject(new Error('closed during upgrade')); this.died(this.closeError); });
    });
  }

  /** Server frames (unmasked): binary payloads to feed(), close ends. */
  frames(d) {
    let b = this.partial ? Buffer.concat([this.partial, d]) : d;
    this.partial = null;
    while (b.length >= 2) {
      const op = b[0] & 0x0f; let n = b[1] & 0x7f; let off = 2;
      if (n === 126) { if (b.length < 4) break; n = b.readUInt16BE(2); off = 4; } else if (n === 127) {
        if (b.length < 10) break; n = Number(b.readBigUInt64BE(2)); off = 10;
      }
      if (b.length < off + n) break;
      const payload = b.subarray(off, off + n);
      b = b.subarray(off + n);
      if (op === 0x2 || op === 0x0) this.feed(payload);
      else if (op === 0x1) this.text = payload.toString();
      else if (op === 0x8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        this.closeError = new Error(`ws closed ${code} ${payload.subarray(2).toString()} ${this.text || ''}`.trim());
        this.sock.destroy();
        return;
      }
    }
    if (b.length) this.partial = b;
  }

  write(payload) {
    const n = payload.length;
    const hl = n < 126 ? 2 : n < 65536 ? 4 : 10;
    const frame = Buffer.allocUnsafe(hl + 4 + n);
    frame[0] = 0x82;
    if (n < 126) frame[1] = 0x80 | n;
    else if (n < 65536) { frame[1] = 0x80 | 126; frame.writeUInt16BE(n, 2); } else { frame[1] = 0x80 | 127; frame.writeBigUInt64BE(BigInt(n), 2); }
    const mask = crypto.randomBytes(4);
    mask.copy(frame, hl);
    if (maskBuffer) maskBuffer(payload, mask, frame, hl + 4, n);
    else for (let i = 0; i < n; i++) frame[hl + 4 + i] = payload[i] ^ mask[i & 3];
    return this.sock.write(frame);
  }

  get pending() { return this.sock.writableLength; }
  onDrain(fn) { this.sock.once('drain', fn); }
  pauseReading() { this.sock.pause(); }
  close() { this.closed = true; this.sock.destroy(); }
}

/** Open one console up to the end of the RFB handshake (ServerInit read). */
async function openConsole(t, info = null) {
  let c;
  if (t.kind === 'tcp') c = new TcpConn();
  else if (info) c = new RawWsConn();
  else c = new WsConn();
  await c.open(t, info);
  const ver = await c.read(12);
  if (!ver.toString().startsWith('RFB 003.')) throw new Error(`bad RFB version ${JSON.stringify(ver.toString())}`);
  c.write(Buffer.from('RFB 003.008\n'));
  const [n] = await c.read(1);
  if (n === 0) { const [len] = [(await c.read(4)).readUInt32BE(0)]; throw new Error(`RFB refused: ${(await c.read(len)).toString()}`); }
  const types = await c.read(n);
  if (!types.includes(1)) throw new Error(`no security None offered: ${[...types]}`);
  c.write(Buffer.from([1]));
  const res = (await c.read(4)).readUInt32BE(0);
  if (res !== 0) throw new Error(`SecurityResult ${res}`);
  c.write(Buffer.from([1])); // ClientInit, shared
  const si = await c.read(24);
  await c.read(si.readUInt32BE(20));
  return c;
}

function command(mode, arg = 0) {
  const b = Buffer.alloc(8);
  b[0] = mode.charCodeAt(0);
  b.writeUInt32BE(arg, 4);
  return b;
}

/** A FramebufferUpdateRequest (incremental, the whole 1024x768 screen): starts the backend's framed stream. */
function updateRequest() {
  return Buffer.from([3, 1, 0, 0, 0, 0, 4, 0, 3, 0]);
}

// CPU seconds (user + system) of a process, from /proc/PID/stat; USER_HZ is 100 on Linux.
function procCpu(pid) {
  if (!pid) return null;
  try {
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(')').pop().trim().split(/\s+/);
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch (e) { return null; }
}

// Seconds the process's threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat).
function procWait(pid) {
  if (!pid) return null;
  try {
    let ns = 0;
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[1]);
    }
    return ns / 1e9;
  } catch (e) { return null; }
}

/** The proxy's CPU share over a window [c0 at t0, now at t1] (job.proxy_pid), or null. */
function cpuShare(job, c0, t0, t1) {
  const c1 = procCpu(job.proxy_pid);
  return c0 === null || c1 === null ? null : (c1 - c0) / ((t1 - t0) / 1000);
}

/** CPU seconds of the load side: this client and, when given, the backend (job.backend_pid). */
function loadCpu(job) {
  const own = process.cpuUsage();
  const backend = job.backend_pid ? procCpu(job.backend_pid) : 0;
  return backend === null ? null : (own.user + own.system) / 1e6 + backend;
}

/** Start of a window: the proxy's CPU and run-queue wait so far (and the load side's CPU). */
function proxyMark(job) {
  return { cpu: procCpu(job.proxy_pid), wait: procWait(job.proxy_pid), load: loadCpu(job), t: now() };
}

/** End of a window: the proxy's CPU share, and its share spent waiting for a CPU (others' load). */
function proxyShares(job, m) {
  const t1 = now();
  const w1 = procWait(job.proxy_pid);
  const l1 = loadCpu(job);
  const secs = (t1 - m.t) / 1000;
  return {
    proxy_cpu_share: cpuShare(job, m.cpu, m.t, t1),
    proxy_wait_share: m.wait === null || w1 === null ? null : (w1 - m.wait) / secs,
    // The load side (client + backend, pinned to one CPU): near 100 % means the
    // figure is the load side's limit, not the proxy's.
    load_cpu_share: m.load === null || l1 === null ? null : (l1 - m.load) / secs,
  };
}

function pct(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

// ---- proxy memory, from /proc (RSS of one process; PSS summed over a tree) ----
function children(pid) {
  const out = [];
  try {
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      const s = fs.readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim();
      if (s) out.push(...s.split(/\s+/).map(Number));
    }
  } catch (e) { /* gone */ }
  return out;
}
function procMem(pid) {
  if (!pid) return null;
  const pids = [];
  const stack = [pid];
  while (stack.length && pids.length < 200000) { const p = stack.pop(); pids.push(p); stack.push(...children(p)); }
  let rss = 0; let pss = 0;
  for (const p of pids) {
    try {
      const r = fs.readFileSync(`/proc/${p}/smaps_rollup`, 'utf8');
      rss += Number(/^Rss:\s+(\d+)/m.exec(r)[1]);
      pss += Number(/^Pss:\s+(\d+)/m.exec(r)[1]);
    } catch (e) { /* gone */ }
  }
  return { rss_kib: rss, pss_kib: pss, processes: pids.length };
}

// ---- workloads ----
async function down(job) {
  const conns = await Promise.all(Array.from({ length: job.consoles }, () => openConsole(job.target)));
  let bytes = 0;
  // Framed RFB updates (backend.js), so that consoles with stages pass them too.
  for (const c of conns) { c.raw((d) => { bytes += d.length; }); c.write(updateRequest()); }
  await sleep(job.warmup_ms);
  const b0 = bytes; const t0 = now(); const m = proxyMark(job);
  await sleep(job.duration_ms);
  const b1 = bytes; const t1 = now();
  const shares = proxyShares(job, m);
  const dead = conns.filter((c) => c.closed).length;
  conns.forEach((c) => c.close());
  return { mib_s: (b1 - b0) / 1048576 / ((t1 - t0) / 1000), errors: dead, bytes, ...shares };
}

async function up(job) {
  const c = await openConsole(job.target);
  const frame = Buffer.alloc(job.frame, 0x5a);
  const window = Math.max(job.window || (4 << 20), 2 * frame.length + ACK_UNIT);
  let acked = 0; let sent = 0;
  c.write(command('U'));
  let draining = false;
  const pump = () => {
    if (draining) return;
    while (!c.closed && sent - acked < window) {
      sent += frame.length;
      if (!c.write(frame)) { draining = true; c.onDrain(() => { draining = false; pump(); }); return; }
    }
  };
  c.raw((d) => { acked += d.length * ACK_UNIT; pump(); });
  pump();
  await sleep(job.warmup_ms);
  const a0 = acked; const t0 = now(); const m = proxyMark(job);
  await sleep(job.duration_ms);
  const a1 = acked; const t1 = now();
  const shares = proxyShares(job, m);
  const err = c.closed ? 1 : 0;
  c.close();
  return { mib_s: (a1 - a0) / 1048576 / ((t1 - t0) / 1000), errors: err, ...shares };
}

async function rtt(job) {
  const c = await openConsole(job.target);
  c.write(command('E'));
  const msg = Buffer.alloc(16, 0x70);
  let got = 0; let wake = null;
  c.raw((d) => { got += d.length; if (got >= 16 && wake) { got -= 16; const w = wake; wake = null; w(); } });
  const lat = [];
  const until = now() + job.warmup_ms + job.duration_ms;
  const measureFrom = now() + job.warmup_ms;
  while (now() < until && lat.length < (job.max_samples || 200000)) {
    const t0 = now();
    await new Promise((r) => { wake = r; c.write(msg); });
    if (t0 >= measureFrom) lat.push(now() - t0);
    if (c.closed) break;
  }
  c.close();
  lat.sort((a, b) => a - b);
  return { p50_us: pct(lat, 50) * 1000, p99_us: pct(lat, 99) * 1000, samples: lat.length, errors: c.error && !c.closed ? 1 : 0 };
}

async function setup(job) {
  let done = 0; let errors = 0; const lat = []; const errs = {};
  const until = now() + job.duration_ms;
  // Setup-only consoles over raw sockets unless the job asks for the ws
  // library (raw: false), e.g. to compare the two clients.
  const raw = job.raw !== false && job.target.kind !== 'tcp';
  const worker = async () => {
    const info = raw ? new InfoConn(job.target) : null;
    while (now() < until) {
      const t0 = now();
      try {
        const c = await openConsole(job.target, info);
        lat.push(now() - t0);
        done += 1;
        c.close();
      } catch (e) { errors += 1; errs[String(e.message).slice(0, 80)] = (errs[String(e.message).slice(0, 80)] || 0) + 1; await sleep(5); }
    }
  };
  const t0 = now();
  const cpu0 = process.cpuUsage();
  await Promise.all(Array.from({ length: job.parallel }, worker));
  const secs = (now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  lat.sort((a, b) => a - b);
  return {
    per_s: done / secs, p50_ms: pct(lat, 50), errors, error_kinds: errs, done, secs,
    // How busy this client kept its core (CPU 1, shared with the backend).
    client_cpu_share: (cpu.user + cpu.system) / 1e6 / secs,
  };
}

/** N open consoles each pinging 16 bytes once a second; proxy memory before/loaded. */
async function conc(job) {
  const n = job.consoles;
  const before = procMem(job.proxy_pid);
  const conns = []; let errors = 0; const errs = {};
  let next = 0;
  const t0 = now();
  const opener = async () => {
    while (next < n) {
      next += 1;
      try { conns.push(await openConsole(job.target)); } catch (e) {
        errors += 1; const k = String(e.message).slice(0, 80); errs[k] = (errs[k] || 0) + 1;
      }
    }
  };
  await Promise.all(Array.from({ length: job.parallel || 64 }, opener));
  const rampS = (now() - t0) / 1000;
  const lat = []; let lost = 0;
  const msg = Buffer.alloc(16, 0x70);
  const timers = [];
  for (const [i, c] of conns.entries()) {
    c.write(command('E'));
    let sentAt = 0; let got = 0; let outstanding = false;
    c.raw((d) => {
      got += d.length;
      while (got >= 16 && outstanding) { got -= 16; outstanding = false; lat.push(now() - sentAt); }
    });
    c.onclose = () => { lost += 1; };
    const ping = () => {
      if (c.closed) return;
      if (outstanding) lost += 0; // still waiting: counted as late, latency recorded when it lands
      sentAt = now(); outstanding = true; c.write(msg);
    };
    timers.push(setTimeout(() => { ping(); timers.push(setInterval(ping, 1000)); }, (i * 1000) / conns.length));
  }
  await sleep(job.settle_ms || 2000);
  lat.length = 0;
  const loaded = procMem(job.proxy_pid);
  await sleep(job.hold_ms);
  const loaded2 = procMem(job.proxy_pid);
  timers.forEach((t) => clearTimeout(t));
  const open = conns.filter((c) => !c.closed).length;
  conns.forEach((c) => { c.onclose = null; c.close(); });
  lat.sort((a, b) => a - b);
  const lmax = loaded && loaded2 ? (loaded2.rss_kib > loaded.rss_kib ? loaded2 : loaded) : loaded;
  const key = job.mem_key || 'rss_kib';
  return {
    consoles: n, open, errors: errors + lost, error_kinds: errs,
    establish_per_s: conns.length / rampS,
    mem_before_kib: before && before[key], mem_loaded_kib: lmax && lmax[key], mem_kind: key,
    processes: lmax && lmax.processes,
    per_console_kib: before && lmax ? (lmax[key] - before[key]) / n : null,
    p50_ms: pct(lat, 50), p99_ms: pct(lat, 99), samples: lat.length,
  };
}

/** One console whose client stops reading while the backend streams without end. */
async function stall(job) {
  const c = await openConsole(job.target);
  const before = procMem(job.proxy_pid);
  c.raw(() => {});
  c.write(command('S', 65536));
  await sleep(200);
  c.pauseReading();
  const samples = [];
  const end = now() + job.duration_ms;
  while (now() < end) { await sleep(250); const m = procMem(job.proxy_pid); if (m) samples.push(m[job.mem_key || 'rss_kib']); }
  const alive = !c.closed;
  c.close();
  return {
    mem_before_kib: before && before[job.mem_key || 'rss_kib'],
    mem_max_kib: Math.max(...samples), mem_last_kib: samples[samples.length - 1],
    mem_kind: job.mem_key || 'rss_kib', alive,
  };
}

const WORKLOADS = { down, up, rtt, setup, conc, stall };

async function main() {
  const job = JSON.parse(process.argv[2]);
  const timeout = setTimeout(() => { process.stdout.write(JSON.stringify({ error: 'client timeout' }) + '\n'); process.exit(2); }, job.timeout_ms || 300000);
  try {
    const res = await WORKLOADS[job.workload](job);
    process.stdout.write(JSON.stringify(res) + '\n');
  } catch (e) {
    process.stdout.write(JSON.stringify({ error: String(e && e.message || e) }) + '\n');
  }
  clearTimeout(timeout);
  agent.destroy();
  process.exit(0);
}

main();
