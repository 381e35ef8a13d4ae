// Drives the control room in headless Chromium (playwright-core, system
// Chromium): a console page connected to the VM, then /admin, which must
// list that console and its recording; a screenshot of it; its Watch link,
// which must open a view-only console; then its Terminate button, which
// must close the console (4010).  Prints one JSON
// line with what both pages said.
//
//   node tests/e2e/admin_driver.mjs '{"console_url": U, "admin_url": A, "screenshot": P, "timeout_ms": N}'
//
// (U may be a share link's page: the control room then names the share.)
import { launchChromium, sleep, waitFor } from "./browser.mjs";

const spec = JSON.parse(process.argv[2]);

const browser = await launchChromium();
const out = { errors: [] };
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 560 } });
  const consolePage = await context.newPage();
  consolePage.on("pageerror", (e) => out.errors.push("console: " + String(e)));
  await consolePage.goto(spec.console_url);
  out.connected = await waitFor(consolePage, () => window.vapor && window.vapor.state === "connected", spec.timeout_ms);
  await sleep(1500);  // some bytes to count, some recording to list
  const admin = await context.newPage();
  admin.on("pageerror", (e) => out.errors.push("admin: " + String(e)));
  await admin.goto(spec.admin_url);
  out.listed = await waitFor(admin, () => window.vaporAdmin && window.vaporAdmin.refreshes >= 2
    && window.vaporAdmin.consoles.length >= 1 && (window.vaporAdmin.recordings || []).length >= 1, spec.timeout_ms);
  out.admin = await admin.evaluate(() => JSON.parse(JSON.stringify(window.vaporAdmin)));
  out.adminUrl = admin.url();
  out.rows = await admin.evaluate(() => document.querySelectorAll("#consoles tbody tr").length);
  out.users = await admin.evaluate(() => [...document.querySelectorAll("#consoles tbody tr")].map((tr) => tr.cells[0].textContent));
  out.playLinks = await admin.evaluate(() => [...document.querySelectorAll("#recordings a")].map((a) => a.getAttribute("href")));
  if (spec.screenshot) await admin.screenshot({ path: spec.screenshot });
  // Watch: a view-only console of the VM in a new tab (the key in its fragment).
  out.watchLinks = await admin.evaluate(() => [...document.querySelectorAll("#consoles a")].map((a) => a.getAttribute("href")));
  const [watcher] = await Promise.all([context.waitForEvent("page"), admin.click("#consoles a")]);
  watcher.on("pageerror", (e) => out.errors.push("watch: " + String(e)));
  out.watched = await waitFor(watcher, () => window.vapor && window.vapor.state === "connected", spec.timeout_ms);
  out.watcher = await watcher.evaluate(() => JSON.parse(JSON.stringify(window.vapor)));
  await admin.click("#consoles tbody button");
  out.terminated = await waitFor(consolePage, () => window.vapor.closeCode === 4010, spec.timeout_ms);
  out.console = await consolePage.evaluate(() => JSON.parse(JSON.stringify(window.vapor)));
  out.afterTerminate = await waitFor(admin, () => window.vaporAdmin.consoles.length === 0
    && (window.vaporAdmin.recordings || []).every((r) => r.outcome !== "LIVE"), spec.timeout_ms);
  out.adminAfter = await admin.evaluate(() => JSON.parse(JSON.stringify(window.vaporAdmin)));
} catch (e) {
  out.fatal = String(e && e.stack ? e.stack : e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
