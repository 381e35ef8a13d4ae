// Drives the playback page in headless Chromium (playwright-core, system
// Chromium) like a person with its controls, and prints one JSON line:
// what window.vaporPlayback said at each point, the time shown, and PNGs
// of the screen (the largest canvas under #screen).
//
//   node tests/e2e/playback_driver.mjs '{"url": U, "end_png": P, "timeout_ms": N,
//       "speed": 8,               (optional) pick this speed in the select while playing,
//                                 and measure how far the position moves in 1 s
//       "seek_png": P, "seek_ms": N | "seek_middle": true,
//                                 (optional) after the end, seek there with the seek bar
//       "play_pause": true,       (optional) then at 1x Play for a while, Pause, and watch it hold
//       "load_newer_after_ms": N, (optional) a live recording: at its end ("live"), wait N ms,
//                                 click Load newer and play to the new end
//       "settle_ms": N}'          (optional) stay N ms on the page at the end (to catch late
//                                 console errors such as noVNC's 3 s disconnection timeout)
//
// Also reported: every (time shown, state) the page went through from its
// load (timeLog), and what the page logged to the console as errors.
import { launchChromium, saveCanvas, sleep, waitFor } from "./browser.mjs";

const spec = JSON.parse(process.argv[2]);
// Playback moves fast: look twice as often as the default.
const waitFast = (page, predicate, timeoutMs) => waitFor(page, predicate, timeoutMs, 50);

const state = (page) => page.evaluate(() => ({
  ...window.vaporPlayback,
  shown: document.getElementById("time").textContent,
  button: document.getElementById("play").textContent,
  status: document.getElementById("status").textContent,
  moreShown: !document.getElementById("more").hidden,
}));

// Notes each change of the time shown, from the page's first script on.
function logTimes() {
  window.__timeLog = [];
  setInterval(() => {
    const time = document.getElementById("time");
    if (!time || !window.vaporPlayback) return;
    const last = window.__timeLog[window.__timeLog.length - 1];
    const now = { shown: time.textContent, state: window.vaporPlayback.state };
    if (!last || last.shown !== now.shown || last.state !== now.state) {
      window.__timeLog.push({ ...now, atMs: Math.round(performance.now()) });  // since navigation
    }
  }, 5);
}

async function loadNewer(page, out) {
  await sleep(spec.load_newer_after_ms);
  await page.click("#more");
  out.loadedNewer = await waitFast(page, () => window.vaporPlayback.loads >= 2
    && ["live", "ended"].includes(window.vaporPlayback.state), spec.timeout_ms);
  out.afterNewer = await state(page);
}

async function checkSpeed(page, out) {
  await page.selectOption("#speed", String(spec.speed));
  const before = await state(page);
  const t0 = Date.now();
  await sleep(1000);
  const after = await state(page);
  out.speedCheck = { speed: after.speed, fromMs: before.positionMs, toMs: after.positionMs, realMs: Date.now() - t0,
    stillPlaying: after.state === "playing" };
}

async function seek(page, out) {
  const target = spec.seek_middle ? Math.floor(out.atEnd.durationMs / 2) : spec.seek_ms;
  await page.$eval("#seek", (el, v) => {
    el.value = String(v);
    el.dispatchEvent(new Event("change", { bubbles: true }));
  }, target);
  out.seekTarget = Number(await page.$eval("#seek", (el) => el.value));  // the bar's step rounds it
  await waitFast(page, () => window.vaporPlayback.fed > 0, 5000);
  await sleep(1000);  // SPICE: the later channels link and draw
  out.afterSeek = await state(page);
  out.seekPng = await saveCanvas(page, spec.seek_png);
}

async function playPause(page, out) {
  await page.selectOption("#speed", "1");
  await page.click("#play");
  await sleep(800);
  const playing = await state(page);
  await page.click("#play");
  const paused = await state(page);
  await sleep(700);
  const held = await state(page);
  out.playPause = { playing, paused, held };
}

const browser = await launchChromium();
const out = { errors: [] };
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => out.errors.push(String(e)));
  out.consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") out.consoleErrors.push(m.text()); });
  await page.addInitScript(logTimes);
  await page.goto(spec.url);
  out.started = await waitFast(page, () => window.vaporPlayback
    && ["playing", "ended", "failed"].includes(window.vaporPlayback.state), spec.timeout_ms);
  out.atStart = await state(page);
  if (spec.speed && out.atStart.state === "playing") await checkSpeed(page, out);
  out.ended = await waitFast(page, () => window.vaporPlayback
    && ["ended", "live", "failed"].includes(window.vaporPlayback.state),
    spec.timeout_ms);
  out.urlAfterLoad = page.url();
  await sleep(300);
  out.atEnd = await state(page);
  out.endPng = await saveCanvas(page, spec.end_png);
  if (out.atEnd.state === "ended" && (spec.seek_ms !== undefined || spec.seek_middle)) {
    await seek(page, out);
    if (spec.play_pause) await playPause(page, out);
  }
  if (out.atEnd.state === "live" && spec.load_newer_after_ms !== undefined) await loadNewer(page, out);
  if (spec.settle_ms) await sleep(spec.settle_ms);
  out.timeLog = await page.evaluate(() => window.__timeLog);
} catch (e) {
  out.fatal = String(e && e.stack ? e.stack : e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
