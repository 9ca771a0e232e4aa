#!/usr/bin/env node
// Open the web example in headless Chromium (Debian's /usr/bin/chromium by default) through
// playwright-core, wait for the generation to finish, save a screenshot, and print the page's result
// ({text, ids, ep, error}) as JSON on the last line.
//
//   node examples/web/headless.mjs URL [--screenshot out.png] [--timeout 120] [--chromium /usr/bin/chromium]
//
// URL should carry autorun=1 (see app.mjs). Chromium starts with a fresh profile and no network
// services (the page talks to 127.0.0.1 only).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args.splice(i, 2)[1] : dflt;
};
const shot = opt("--screenshot", null);
const timeout = Number(opt("--timeout", "120")) * 1000;
const exe = opt("--chromium", "/usr/bin/chromium");
const url = args[0];
if (!url) {
  process.stderr.write("usage: node headless.mjs URL [--screenshot PNG] [--timeout S] [--chromium PATH]\n");
  process.exit(2);
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "edgeseq-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: exe,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run"],
    viewport: { width: 960, height: 720 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const console_ = [];
  page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));
  await page.goto(url);
  try {
    await page.waitForFunction(() => window.edgeseqResult !== undefined, null, { timeout });
  } catch (e) {
    throw new Error(`the page did not finish within ${timeout / 1000} s; console:\n${console_.join("\n")}`);
  }
  const result = await page.evaluate(() => window.edgeseqResult);
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  result.console = console_.slice(-20);
  process.stdout.write(JSON.stringify(result) + "\n");
} catch (e) {
  process.stderr.write(`error: ${e.message}\n`);
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
