#!/usr/bin/env python3
"""Build the documentation site and check it in headless Chromium, as a reader would see it.

1. ``mkdocs build --strict`` into a fresh folder;
2. serve it on 127.0.0.1 (a free port, this process's own server);
3. Chromium (Debian's ``chromium``) loads the reference index and the reference pages and
   the DOM must list ``Matcher``, ``ThresholdPolicy``, ``PairCache`` and ``MergeConfig``,
   each with its documented entry;
4. the home page is opened inside a same-origin frame whose script reports every picture
   in the page content: each must have loaded (``naturalWidth > 0``);
5. a screenshot of the home page is saved (``--out``) and must not be blank.

Exits non-zero with one line per failed check. Standard library only, plus Pillow when it
is installed (for the blank-screenshot check).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
#: name -> (reference page that documents it, the anchor id of its entry)
REQUIRED = {
    "Matcher": ("reference/policies/", "tokenmerge.policies.Matcher"),
    "ThresholdPolicy": ("reference/policies/", "tokenmerge.policies.ThresholdPolicy"),
    "PairCache": ("reference/policies/", "tokenmerge.policies.PairCache"),
    "MergeConfig": ("reference/tokenmerge/", "tokenmerge.MergeConfig"),
}
HARNESS = """<!doctype html>
<html><body>
<pre id="result">pending</pre>
<iframe id="page" src="{page}" width="1280" height="2000"></iframe>
<script>
function report() {{
  const doc = document.getElementById("page").contentDocument;
  const images = Array.from(doc.querySelectorAll("article img, .md-content img"));
  const found = images.map(img => ({{src: img.getAttribute("src"), complete: img.complete,
                                      width: img.naturalWidth, height: img.naturalHeight}}));
  document.getElementById("result").textContent = JSON.stringify(found);
}}
window.addEventListener("load", () => setTimeout(report, 500));
</script>
</body></html>
"""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("docs check: chromium is not installed (apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


@contextlib.contextmanager
def serve(site: Path):
    """Serve ``site`` on 127.0.0.1 in a thread of this process; yields the base URL."""
    port = free_port()

    def handler(*args, **kwargs):
        return _QuietHandler(*args, directory=str(site), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(base, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base
    finally:
        server.shutdown()
        server.server_close()


def chromium(binary: str, profiles: Path, *args: str, timeout: int = 120) -> str:
    """Run headless Chromium with a fresh profile (a new folder under ``profiles``); returns stdout."""
    profile = tempfile.mkdtemp(prefix="profile-", dir=profiles)
    command = [binary, *CHROME_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"docs check: chromium exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def check_reference(binary: str, profile: Path, base: str) -> list[str]:
    failures = []
    index = chromium(binary, profile, "--dump-dom", base + "reference/")
    pages: dict[str, str] = {}
    for name, (page, anchor) in REQUIRED.items():
        if not re.search(rf"<code>{name}</code>", index):
            failures.append(f"reference index does not list {name}")
        if page not in pages:
            pages[page] = chromium(binary, profile, "--dump-dom", base + page)
        if f'id="{anchor}"' not in pages[page]:
            failures.append(f"{page} has no entry for {name} (id={anchor!r})")
    return failures


def check_home_pictures(binary: str, profile: Path, base: str, site: Path) -> list[str]:
    harness = site / "__docs_check.html"
    harness.write_text(HARNESS.format(page="./"), encoding="utf-8")
    try:
        dom = chromium(binary, profile, "--virtual-time-budget=15000", "--dump-dom", base + harness.name)
    finally:
        harness.unlink()
    match = re.search(r'<pre id="result">(.*?)</pre>', dom, re.DOTALL)
    if match is None or match.group(1) == "pending":
        return ["home page: the picture check did not run"]
    images = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    if not images:
        return ["home page has no picture in its content"]
    broken = [img["src"] for img in images if not (img["complete"] and img["width"] > 0)]
    if broken:
        return [f"home page picture did not load: {src}" for src in broken]
    loaded = ", ".join(f"{img['src']} ({img['width']}x{img['height']})" for img in images)
    print(f"docs check: home page pictures load: {loaded}")
    return []


def check_screenshot(binary: str, profile: Path, base: str, out: Path) -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    chromium(binary, profile, "--window-size=1280,1400", "--virtual-time-budget=10000", f"--screenshot={out}", base)
    if not out.is_file() or out.stat().st_size == 0:
        return [f"no screenshot written to {out}"]
    try:
        from PIL import Image
    except ImportError:
        print("docs check: Pillow not installed; screenshot saved but not inspected")
        return []
    with Image.open(out) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    if colours is None or len(colours) < 64:
        return [f"screenshot {out} looks blank ({0 if colours is None else len(colours)} colours)"]
    print(f"docs check: screenshot {out} ({len(colours)} colours)")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "docs", help="where the screenshot goes")
    parser.add_argument("--site", type=Path, default=None, help="build into this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with mkdocs' output
    binary = find_chromium()
    with tempfile.TemporaryDirectory(prefix="tokenmerge-docs-") as tmp:
        site = args.site or Path(tmp) / "site"
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        build = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-d", str(site)], cwd=ROOT, env=env
        )
        if build.returncode != 0:
            print("docs check: mkdocs build --strict failed", file=sys.stderr)
            return 1
        profile = Path(tmp) / "chromium-profile"
        profile.mkdir()
        with serve(site) as base:
            failures = check_reference(binary, profile, base)
            failures += check_home_pictures(binary, profile, base, site)
            failures += check_screenshot(binary, profile, base, args.out / "home.png")
    for failure in failures:
        print(f"docs check: FAILED: {failure}", file=sys.stderr)
    if failures:
        return 1
    print("docs check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
