// What the browser drivers of the end-to-end tests share: headless system
// Chromium through playwright-core (never a downloaded browser), waiting
// on a condition in a page, and saving the console's screen as a PNG.
import { writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Headless Chromium ($VAPOR_CHROMIUM, else /usr/bin/chromium); the caller closes it.
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.VAPOR_CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
    headless: true,
  });
}

// Poll `predicate` in the page every `everyMs` until it is true or
// `timeoutMs` pass; whether it came true.
export async function waitFor(page, predicate, timeoutMs, everyMs = 100) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await page.evaluate(predicate)) return true;
    await sleep(everyMs);
  }
  return false;
}

// Save the largest canvas under #screen (the console's screen) as a PNG
// file at `path`; whether there was one (and a path).
export async function saveCanvas(page, path) {
  const data = await page.evaluate(() => {
    let best = null;
    for (const c of document.querySelectorAll("#screen canvas")) {
      if (c.width && c.height && (!best || c.width * c.height > best.width * best.height)) best = c;
    }
    return best ? best.toDataURL("image/png") : null;
  });
  if (!data || !path) return false;
  writeFileSync(path, Buffer.from(data.split(",")[1], "base64"));
  return true;
}
