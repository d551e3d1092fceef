"""Browser smoke test of the built documentation site.

Usage (after ``mkdocs build --strict``, which writes ``site/``):

    python .ci/docs_browser.py site [--screenshot DIR]

Serves the site on 127.0.0.1, opens every page in headless Chromium through Playwright and
fails if a page logs a console error, throws, requests something that fails (the site must
work offline: no request may leave 127.0.0.1), has an image that did not load, or — on
pages with formulas — shows no typeset math. Needs ``pip install playwright`` and a
Chromium: Debian's (``apt-get install chromium``, found at /usr/bin/chromium) or one given
by ``CHROMIUM=/path``; Playwright's own browser download is not used.
Exits 0 and prints ``N passed, 0 failed`` when every page is clean.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import sys
import threading
from pathlib import Path


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the browser closing a connection early (a broken pipe) is not a page error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save a full-page PNG of every tutorial page here")
    args = parser.parse_args()
    site = args.site.resolve()
    pages = sorted(p.relative_to(site) for p in site.rglob("index.html"))
    if not pages:
        print(f"no pages under {site}", file=sys.stderr)
        return 1
    browser_path = chromium_path()
    if browser_path is None:
        print("no Chromium found (apt-get install chromium, or set CHROMIUM)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_Quiet, directory=str(site))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    failures: list[str] = []
    passed = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True,
                                        args=["--no-sandbox"])
            context = browser.new_context()
            # offline: anything not served by the local server is an error
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(base) else route.abort())
            for rel in pages:
                url = base + str(rel.parent).replace(".", "") + ("/" if str(rel.parent) != "."
                                                                  else "")
                url = url.replace("//", "/").replace("http:/", "http://")
                problems: list[str] = []
                page = context.new_page()
                page.on("console", lambda m, pr=problems: pr.append(f"console {m.type}: {m.text}")
                        if m.type == "error" else None)
                page.on("pageerror", lambda e, pr=problems: pr.append(f"exception: {e}"))
                page.on("requestfailed", lambda r, pr=problems: pr.append(
                    f"request failed: {r.url[:100]} ({r.failure})"))
                page.on("response", lambda r, pr=problems: pr.append(
                    f"HTTP {r.status}: {r.url[:100]}") if r.status >= 400 else None)
                page.goto(url, wait_until="load")
                has_math = page.evaluate("document.querySelectorAll('.arithmatex').length")
                if has_math:
                    try:
                        page.wait_for_function(
                            "window.MathJax && MathJax.startup && MathJax.startup.promise"
                            " && document.querySelectorAll('mjx-container').length > 0",
                            timeout=30_000)
                    except Exception as err:  # noqa: BLE001 - reported as a failure below
                        problems.append(f"math not typeset: {err}")
                broken = page.evaluate(
                    "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                    ".map(i => i.alt || i.src.slice(0, 80))")
                problems += [f"image did not load: {b}" for b in broken]
                images = page.evaluate("document.images.length")
                if args.screenshot and str(rel).startswith("tutorial/"):
                    args.screenshot.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.screenshot / (str(rel.parent).replace("/", "_")
                                                                 + ".png")), full_page=True)
                page.close()
                status = "ok" if not problems else "FAIL"
                print(f"{status:4s} {rel.parent}/ ({images} images, "
                      f"{'math' if has_math else 'no math'})")
                if problems:
                    failures += [f"{rel.parent}/: {problem}" for problem in problems]
                else:
                    passed += 1
            browser.close()
    finally:
        server.shutdown()
    for failure in failures:
        print("  " + failure)
    failed = len(pages) - passed
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
