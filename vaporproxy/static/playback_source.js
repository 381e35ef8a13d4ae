// Where the playback page gets a recording: its metadata (for the length
// before the file is in, and whether its console is still live) and its
// file, which a live recording keeps growing.  The bytes written since the
// last load are fetched with a Range request (the data route serves the
// file with twisted.web's File), so loading what is newer costs only what
// is new.
"use strict";

const API = "/api/v1/console/recordings/";

// What an error answer says: its JSON code, else the HTTP status.
async function failure(response) {
  let code = `HTTP ${response.status}`;
  try { code = (await response.json()).code || code; } catch (e) { /* not JSON */ }
  return new Error(code);
}

export class RecordingSource {
  constructor(id, key) {
    this.url = API + encodeURIComponent(id);
    this.headers = key ? { Authorization: `Bearer ${key}` } : {};
    this.bytes = new Uint8Array(0);
  }

  // The recording's metadata ({outcome, complete, duration_s, …}), or null
  // when the API cannot say (the file may still play).
  async meta() {
    try {
      const response = await fetch(this.url, { headers: this.headers, cache: "no-store" });
      return response.ok ? await response.json() : null;
    } catch (e) {
      return null;
    }
  }

  // The whole file as it is now.
  async load() {
    const response = await fetch(this.url + "/data", { headers: this.headers, cache: "no-store" });
    if (!response.ok) throw await failure(response);
    this.bytes = new Uint8Array(await response.arrayBuffer());
    return this.bytes.buffer;
  }

  // The bytes appended since the last load; whether there were any.
  async more() {
    const headers = { ...this.headers, Range: `bytes=${this.bytes.byteLength}-` };
    const response = await fetch(this.url + "/data", { headers, cache: "no-store" });
    if (response.status === 416) return false;  // nothing past what we have
    if (!response.ok) throw await failure(response);
    const got = new Uint8Array(await response.arrayBuffer());
    if (response.status !== 206) {  // the whole file again
      const grew = got.byteLength > this.bytes.byteLength;
      this.bytes = got;
      return grew;
    }
    if (!got.byteLength) return false;
    const joined = new Uint8Array(this.bytes.byteLength + got.byteLength);
    joined.set(this.bytes);
    joined.set(got, this.bytes.byteLength);
    this.bytes = joined;
    return true;
  }

  get buffer() { return this.bytes.buffer; }
}
