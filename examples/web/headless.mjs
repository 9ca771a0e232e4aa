#!/usr/bin/env node
// Open the web example in headless Chromium (Debian's /usr/bin/chromium by default) through
// playwright-core, wait for each generation to finish, save screenshots, and print each page's result
// ({text, ids, ep, error, ...}) as one JSON line, in the order of the URLs.
//
//   node examples/web/headless.mjs URL... [--screenshot out.png] [--timeout 120] [--chromium PATH] [--webgpu]
//
// URLs should carry autorun=1 (see app.mjs); they are visited one after the other in one browser. With
// several URLs, --screenshot out.png saves out.png, out-1.png, out-2.png, ... Chromium starts with a
// fresh profile and no network services (the page talks to 127.0.0.1 only), with --disable-gpu, or with
// --webgpu its software WebGPU adapter (SwiftShader).
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
// --webgpu: let Chromium use its software WebGPU adapter (SwiftShader) instead of --disable-gpu
const webgpu = args.includes("--webgpu") ? args.splice(args.indexOf("--webgpu"), 1).length > 0 : false;
const urls = args;
if (!urls.length) {
  process.stderr.write("usage: node headless.mjs URL... [--screenshot PNG] [--timeout S] [--chromium PATH] [--webgpu]\n");
  process.exit(2);
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "edgeseq-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: exe,
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--no-first-run", ...(webgpu ? ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
        "--enable-features=Vulkan", "--use-vulkan=swiftshader"] : ["--disable-gpu"])],
    viewport: { width: 960, height: 720 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  let console_ = [];
  page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));
  for (const [i, url] of urls.entries()) {
    console_ = [];
    await page.goto(url);
    try {
      await page.waitForFunction(() => window.edgeseqResult !== undefined, null, { timeout });
    } catch (e) {
      throw new Error(`${url}: the page did not finish within ${timeout / 1000} s; console:\n${console_.join("\n")}`);
    }
    const result = await page.evaluate(() => window.edgeseqResult);
    if (shot) await page.screenshot({ path: i ? shot.replace(/(\.png)?$/, `-${i}.png`) : shot, fullPage: true });
    result.console = console_.slice(-20);
    process.stdout.write(JSON.stringify(result) + "\n");
  }
} catch (e) {
  process.stderr.write(`error: ${e.message}\n`);
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
