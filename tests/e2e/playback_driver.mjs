// Drives the playback page in headless Chromium (playwright-core, system
// Chromium) and prints one JSON line: what window.vaporPlayback said, and
// PNGs of the canvas at the end of the recording and after a seek.
//
//   node tests/e2e/playback_driver.mjs '{"url": U, "end_png": P, "seek_png": P, "seek_ms": N, "timeout_ms": N}'
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function canvasPng(page, path) {
  const data = await page.evaluate(() => {
    const canvas = document.querySelector("#screen canvas");
    return canvas ? canvas.toDataURL("image/png") : null;
  });
  if (!data) return false;
  const fs = await import("node:fs");
  fs.writeFileSync(path, Buffer.from(data.split(",")[1], "base64"));
  return true;
}

async function waitFor(page, predicate, timeoutMs) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await page.evaluate(predicate)) return true;
    await sleep(50);
  }
  return false;
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { errors: [] };
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => out.errors.push(String(e)));
  await page.goto(spec.url);
  out.ended = await waitFor(page, () => window.vaporPlayback && ["ended", "failed"].includes(window.vaporPlayback.state),
    spec.timeout_ms);
  out.atEnd = await page.evaluate(() => ({ ...window.vaporPlayback }));
  out.urlAfterLoad = page.url();
  await sleep(300);
  out.endPng = await canvasPng(page, spec.end_png);
  if (out.atEnd.state === "ended") {
    await page.evaluate((ms) => window.vaporPlayer.seek(ms), spec.seek_ms);
    await page.evaluate(() => window.vaporPlayer.pause());
    await sleep(500);
    out.afterSeek = await page.evaluate(() => ({ ...window.vaporPlayback }));
    out.seekPng = await canvasPng(page, spec.seek_png);
  }
} catch (e) {
  out.fatal = String(e && e.stack ? e.stack : e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
