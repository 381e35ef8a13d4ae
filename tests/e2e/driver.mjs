// Browser driver of the end-to-end tests: runs headless system Chromium
// through playwright-core (never downloads a browser) and prints one JSON
// object with what the browser saw.
//
//   node tests/e2e/driver.mjs '<json spec>'
//
// spec = {"timeout_ms": N, "steps": [step, ...]}; steps run in order in one
// browser, and every page stays open until the end (so a later step can
// meet the connection limit an earlier one holds).
//
//   {"kind": "page", "url": U, "until": "connected" | "closed",
//    "paint": bool, "min_channels": n, "timeout_ms": n, "screenshot": path}
//       Loads the bundled console page and waits until window.vapor says
//       connected (with a non-blank canvas when "paint", with at least
//       min_channels open WebSockets), or until a console WebSocket closed.
//       Reports window.vapor, the canvas statistics, each button of the
//       bar ("controls": {id: "enabled" | "disabled"}) and page errors.
//       Then, with "then_connects": n, waits until the page has connected n
//       times in all (reconnects); with "then_closed": true, until a console
//       WebSocket closes (then "settle_ms" more).
//       With "actions" (once connected, before any "then_…" watching), acts
//       like a person on the largest canvas under #screen, in order:
//         {"click": true}                 move to its centre and left-click
//         {"type": "text", "delay_ms": n} type text (key by key)
//         {"press": "Enter"}              press one key
//         {"wait_ms": n}                  wait
//         {"fragment": "key=…"}           set the address's #fragment (a
//                                         same-page navigation, as when a
//                                         person pastes a key)
//       and reports the actions done ("acted") or the error ("action_error").
//       "canvas_png_before" / "canvas_png": paths where the largest canvas
//       under #screen is saved as PNG, before the actions / at the end.
//
//   {"kind": "ws", "origin": U, "ws_url": W, "protocols": [...],
//    "close_after_data": bool, "timeout_ms": n}
//       Opens a page at U (for the Origin header), then a raw WebSocket to
//       W from inside it.  Reports whether it opened, the subprotocol, the
//       text messages, the binary byte count, and the close code/reason.
import { launchChromium, saveCanvas, sleep } from "./browser.mjs";

// Runs in the page: statistics of every canvas under #screen.
function canvasStatsInPage() {
  const out = { canvases: 0, width: 0, height: 0, nonBackground: 0, colors: 0 };
  const colors = new Set();
  for (const c of document.querySelectorAll("#screen canvas")) {
    if (!c.width || !c.height) continue;
    out.canvases += 1;
    out.width = Math.max(out.width, c.width);
    out.height = Math.max(out.height, c.height);
    let data;
    try {
      data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    } catch (e) {
      continue;
    }
    const bg = [data[0], data[1], data[2]];
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] !== bg[0] || data[i + 1] !== bg[1] || data[i + 2] !== bg[2]) {
        out.nonBackground += 1;
      }
      if ((i >> 2) % 7 === 0 && colors.size < 256) {
        colors.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
      }
    }
  }
  out.colors = colors.size;
  return out;
}

// The page box of the largest canvas under #screen (the console's screen).
async function screenBox(page) {
  let best = null;
  for (const c of await page.$$("#screen canvas")) {
    const box = await c.boundingBox();
    if (box && (!best || box.width * box.height > best.width * best.height)) best = box;
  }
  if (!best) throw new Error("no canvas under #screen");
  return best;
}

async function act(page, actions) {
  let done = 0;
  for (const a of actions) {
    if (a.click) {
      const box = await screenBox(page);
      const x = box.x + box.width / 2;
      const y = box.y + box.height / 2;
      await page.mouse.move(x, y);
      await page.mouse.click(x, y, { delay: 50 });
    } else if (a.type !== undefined) {
      await page.keyboard.type(a.type, { delay: a.delay_ms || 50 });
    } else if (a.press) {
      await page.keyboard.press(a.press, { delay: 50 });
    } else if (a.wait_ms) {
      await sleep(a.wait_ms);
    } else if (a.fragment !== undefined) {
      await page.evaluate((f) => { window.location.hash = f; }, a.fragment);
    } else {
      throw new Error("unknown action " + JSON.stringify(a));
    }
    done += 1;
  }
  return done;
}

async function pageStep(browser, step, deadline) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e.message || e)));
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });
  page.on("dialog", (d) => d.dismiss().catch(() => {}));
  const until = step.until || "connected";
  const timeout = Math.min(step.timeout_ms || 20000, deadline - Date.now());
  const started = Date.now();
  await page.goto(step.url, { waitUntil: "load", timeout });
  let vapor = null;
  let canvas = null;
  let reached = false;
  while (Date.now() - started < timeout) {
    vapor = await page.evaluate(() => (window.vapor ? JSON.parse(JSON.stringify(window.vapor)) : null));
    if (vapor) {
      if (until === "closed") {
        if (vapor.closeCode !== null || vapor.state === "failed") {
          reached = true;
          break;
        }
      } else if (
        (vapor.state === "connected" && vapor.channels >= (step.min_channels || 1)) ||
        // A page that is to be closed under the test may get there between
        // two polls: having connected once is what counts then.
        (step.then_closed && vapor.connects >= 1)
      ) {
        canvas = await page.evaluate(canvasStatsInPage);
        if (!step.paint || canvas.nonBackground > 50) {
          reached = true;
          break;
        }
      }
    }
    await sleep(100);
  }
  let acted = null;
  let actionError = null;
  const saved = {};
  if (reached && step.canvas_png_before) saved.before = await saveCanvas(page, step.canvas_png_before);
  if (reached && step.actions) {
    try {
      acted = await act(page, step.actions);
    } catch (e) {
      actionError = String(e && e.message ? e.message : e);
    }
  }
  if (reached && step.then_connects) {
    // Keep watching: the page must reconnect (a fresh token each time)
    // until it has been connected `then_connects` times in all.
    reached = false;
    while (Date.now() - started < timeout) {
      vapor = await page.evaluate(() => JSON.parse(JSON.stringify(window.vapor)));
      if (vapor.connects >= step.then_connects && vapor.state === "connected") {
        reached = true;
        break;
      }
      if (vapor.state === "failed") break;
      await sleep(100);
    }
  } else if (reached && step.then_closed) {
    // Keep watching until a console WebSocket closes.
    reached = false;
    while (Date.now() - started < timeout) {
      vapor = await page.evaluate(() => JSON.parse(JSON.stringify(window.vapor)));
      if (vapor.closeCode !== null) {
        await sleep(step.settle_ms || 0);
        vapor = await page.evaluate(() => JSON.parse(JSON.stringify(window.vapor)));
        reached = true;
        break;
      }
      await sleep(100);
    }
  }
  canvas = await page.evaluate(canvasStatsInPage);
  if (step.canvas_png) saved.end = await saveCanvas(page, step.canvas_png);
  if (step.screenshot) await page.screenshot({ path: step.screenshot });
  return {
    kind: "page",
    url: step.url.replace(/#.*$/, "#…"),
    reached,
    acted,
    action_error: actionError,
    elapsed_ms: Date.now() - started,
    vapor,
    canvas,
    saved,
    controls: await page.evaluate(() => Object.fromEntries(
      [...document.querySelectorAll("#bar button")].map((b) => [b.id, b.disabled ? "disabled" : "enabled"]))),
    address: await page.evaluate(() => window.location.href),
    errors: errors.slice(0, 20),
  };
}

const originPages = new Map();

async function wsStep(browser, step, deadline) {
  let page = originPages.get(step.origin);
  if (!page) {
    const context = await browser.newContext();
    page = await context.newPage();
    await page.goto(step.origin, { waitUntil: "load" });
    originPages.set(step.origin, page);
  }
  const timeout = Math.min(step.timeout_ms || 10000, deadline - Date.now());
  const result = await page.evaluate(
    ({ url, protocols, timeout, closeAfterData }) =>
      new Promise((resolve) => {
        const r = { opened: false, protocol: null, texts: [], binaryBytes: 0, closeCode: null, closeReason: null, timedOut: false };
        let ws;
        try {
          ws = protocols && protocols.length ? new WebSocket(url, protocols) : new WebSocket(url);
        } catch (e) {
          r.error = String(e);
          resolve(r);
          return;
        }
        ws.binaryType = "arraybuffer";
        const timer = setTimeout(() => {
          r.timedOut = true;
          ws.close();
          resolve(r);
        }, timeout);
        ws.onopen = () => {
          r.opened = true;
          r.protocol = ws.protocol;
        };
        ws.onmessage = (e) => {
          if (typeof e.data === "string") {
            r.texts.push(e.data);
          } else {
            r.binaryBytes += e.data.byteLength;
            if (closeAfterData) ws.close(1000);
          }
        };
        ws.onclose = (e) => {
          clearTimeout(timer);
          r.closeCode = e.code;
          r.closeReason = e.reason;
          resolve(r);
        };
      }),
    { url: step.ws_url, protocols: step.protocols || [], timeout, closeAfterData: !!step.close_after_data },
  );
  return { kind: "ws", ...result };
}

async function main() {
  const spec = JSON.parse(process.argv[2] || "{}");
  const deadline = Date.now() + (spec.timeout_ms || 60000);
  const browser = await launchChromium();
  const results = [];
  try {
    for (const step of spec.steps || []) {
      if (Date.now() > deadline) {
        results.push({ kind: step.kind, error: "driver deadline passed" });
        continue;
      }
      try {
        if (step.kind === "page") results.push(await pageStep(browser, step, deadline));
        else if (step.kind === "ws") results.push(await wsStep(browser, step, deadline));
        else results.push({ kind: step.kind, error: "unknown step kind" });
      } catch (e) {
        results.push({ kind: step.kind, error: String(e && e.message ? e.message : e) });
      }
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify({ results }) + "\n");
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ fatal: String(e && e.stack ? e.stack : e) }) + "\n");
  process.exit(1);
});
