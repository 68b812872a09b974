"""Real-browser test of the built book: every page works offline, math, mermaid and widgets render.

`make test` builds the book first (`make book`), then runs this against `_build/html`, served
over http://127.0.0.1 by a local http.server. Debian's chromium is driven by Playwright; every
request that leaves 127.0.0.1 is blocked *and* counts as a failure, which proves the site needs
no network (no CDN). One full-page screenshot per page type goes to `_build/screenshots/`.

Environment (for trying it on another build, e.g. a scratch book):
  BOOK_DIR   folder with _toc.yml and _config.yml        (default: the repository root)
  SITE_DIR   the built HTML site                         (default: <repository>/_build/html)
  CHROMIUM   the chromium executable                     (default: /usr/bin/chromium)
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
BOOK_DIR = Path(os.environ.get("BOOK_DIR", REPO)).resolve()
SITE_DIR = Path(os.environ.get("SITE_DIR", REPO / "_build" / "html")).resolve()
SCREENSHOT_DIR = SITE_DIR.parent / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

CHAPTER = "chapters/01-transformer.html"
LAB = "labs/01a-attention-and-gpt.html"
SOLUTION = "solutions/01a-attention-and-gpt.html"
TIMEOUT_MS = 20_000  # for any one thing to appear on a page


def _load_yaml(name: str) -> dict:
    path = BOOK_DIR / name
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _html_name(file: str) -> str:
    for suffix in (".md", ".ipynb", ".rst"):
        if file.endswith(suffix):
            file = file[: -len(suffix)]
    return file + ".html"


def toc_pages() -> list[str]:
    """The HTML pages of every `file` entry of _toc.yml, plus index.html (the redirect)."""
    toc = _load_yaml("_toc.yml")
    pages = ["index.html", _html_name(toc["root"])]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(_html_name(node["file"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k not in ("root", "format")})
    return list(dict.fromkeys(pages))


def expected_colab_url(notebook: str) -> str:
    cfg = _load_yaml("_config.yml")
    repo = cfg["repository"]
    owner_name = urlsplit(repo["url"]).path.strip("/").removesuffix(".git")
    book = (repo.get("path_to_book") or "").strip("/")
    colab = (cfg.get("launch_buttons", {}).get("colab_url") or "https://colab.research.google.com").rstrip("/")
    path = f"{book}/{notebook}" if book else notebook
    return f"{colab}/github/{owner_name}/blob/{repo.get('branch', 'main')}/{path}"


# --------------------------------------------------------------------------------------------
# The local web server and the browser
# --------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    # ES modules (mermaid) must be served with a JavaScript MIME type.
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript"}

    def log_message(self, format, *args):  # noqa: A002 - keep the test output clean
        pass

    def send_head(self):
        # Chromium asks for /favicon.ico by itself, at a moment of its choosing; the book has
        # none, and that 404 (a console error) is no fault of the site's pages.
        if self.path.split("?")[0] == "/favicon.ico" and not (Path(self.directory) / "favicon.ico").exists():
            self.send_response(204)
            self.end_headers()
            return None
        return super().send_head()


@dataclass
class Visit:
    """One opened page and everything that went wrong on it (kept listening while open)."""

    path: str
    page: object
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def problems(self, blocked: list[str]) -> list[str]:
        return (
            [f"request left the site (blocked): {u}" for u in blocked]
            + [f"HTTP error: {r}" for r in self.bad_responses]
            + [f"request failed: {r}" for r in self.failed_requests]
            + [f"console error: {m}" for m in self.console_errors]
            + [f"uncaught exception: {m}" for m in self.page_errors]
        )


class Site:
    def __init__(self, base: str, context):
        self.base = base
        self.context = context
        self.visits: dict[str, Visit] = {}
        self.blocked: dict[str, list[str]] = {}  # page path -> URLs blocked while it loaded
        self._current: str | None = None
        context.route("**/*", self._route)

    def _route(self, route):
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            frame = route.request.frame
            owner = self._owner(frame.page if frame else None)
            self.blocked.setdefault(owner, []).append(url)
            route.abort("blockedbyclient")

    def _owner(self, page) -> str:
        for visit in self.visits.values():
            if visit.page == page:
                return visit.path
        return self._current or "?"

    def open(self, path: str) -> Visit:
        """Open a page once (cached) and wait until its math, diagrams and widgets are drawn."""
        if path in self.visits:
            return self.visits[path]
        page = self.context.new_page()
        visit = Visit(path, page)
        self.visits[path] = visit
        self._current = path
        origin = self.base

        page.on("console", lambda m: m.type == "error" and visit.console_errors.append(f"{m.text} [{m.location.get('url', '')}]"))
        page.on("pageerror", lambda e: visit.page_errors.append(str(e)))

        def on_response(r):
            if r.url.startswith(origin) and r.status >= 400:
                visit.bad_responses.append(f"{r.status} {r.url}")

        def on_failed(r):
            if r.url.startswith(origin):
                visit.failed_requests.append(f"{r.url} ({r.failure})")

        page.on("response", on_response)
        page.on("requestfailed", on_failed)

        response = page.goto(f"{self.base}/{path}", wait_until="load")
        assert response is not None and response.status == 200, (
            f"{path}: got HTTP {response.status if response else 'nothing'}"
        )
        page.wait_for_load_state("networkidle")
        self._wait_rendered(visit)
        page.wait_for_load_state("networkidle")
        return visit

    def _wait_rendered(self, visit: Visit) -> None:
        """Whatever the page contains of math, mermaid or widgets must get rendered."""
        page = visit.page
        checks = [
            # (source element, rendered element, what)
            ("div.math, span.math", "mjx-container", "MathJax did not typeset the math"),
            ("pre.mermaid, div.mermaid", ".mermaid svg", "mermaid did not draw the diagram"),
            (
                'script[type="application/vnd.jupyter.widget-view+json"]',
                ".jupyter-widgets",
                "the ipywidgets embed manager drew no widget",
            ),
        ]
        for source, rendered, what in checks:
            if page.locator(source).count():
                try:
                    page.locator(rendered).first.wait_for(state="attached", timeout=TIMEOUT_MS)
                except Exception as exc:  # noqa: BLE001 - report the page's own errors with it
                    pytest.fail(
                        f"{visit.path}: {what} (no {rendered!r} within {TIMEOUT_MS} ms: {type(exc).__name__}).\n"
                        + "\n".join(visit.problems(self.blocked.get(visit.path, [])))
                    )

    def assert_clean(self, visit: Visit) -> None:
        problems = visit.problems(self.blocked.get(visit.path, []))
        assert not problems, f"{visit.path} ({self.base}/{visit.path}):\n  " + "\n  ".join(problems)

    def screenshot(self, visit: Visit, name: str) -> Path:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        out = SCREENSHOT_DIR / f"{name}.png"
        visit.page.screenshot(path=str(out), full_page=True)
        return out


@pytest.fixture(scope="module")
def site():
    index = SITE_DIR / "index.html"
    if not index.is_file():
        pytest.fail(f"{index} does not exist: build the book first (`make book`; `make test` does it).")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM} (set CHROMIUM=/path/to/chromium)")

    handler = functools.partial(_QuietHandler, directory=str(SITE_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
            context.set_default_timeout(TIMEOUT_MS)
            try:
                yield Site(f"http://127.0.0.1:{server.server_address[1]}", context)
            finally:
                context.close()
                browser.close()
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_toc_pages_exist():
    missing = [p for p in toc_pages() if not (SITE_DIR / p).is_file()]
    assert not missing, f"pages listed in {BOOK_DIR / '_toc.yml'} missing from {SITE_DIR}: {missing}"


@pytest.mark.parametrize("path", toc_pages())
def test_page_loads_offline_without_errors(site, path):
    site.assert_clean(site.open(path))


def test_math_is_typeset(site):
    visit = site.open(CHAPTER)
    visit.page.locator("mjx-container").first.wait_for(state="visible")
    assert visit.page.locator("mjx-container").count() >= 1, f"{CHAPTER}: no mjx-container"
    site.assert_clean(visit)


def test_mermaid_is_rendered(site):
    visit = site.open(CHAPTER)
    svg = visit.page.locator(".mermaid svg").first
    svg.wait_for(state="visible")
    # the diagram really has nodes, not just an empty or an error svg
    nodes = visit.page.locator(".mermaid svg .node").count()
    assert nodes >= 2, f"{CHAPTER}: the mermaid svg has {nodes} nodes"
    assert not visit.page.locator(".mermaid svg[aria-roledescription='error']").count(), (
        f"{CHAPTER}: mermaid drew a syntax-error diagram"
    )
    site.assert_clean(visit)


def test_widgets_render_from_saved_state(site):
    visit = site.open(SOLUTION)
    page = visit.page
    for selector, what in [
        (".widget-slider", "IntSlider"),
        (".widget-dropdown select", "Dropdown"),
    ]:
        try:
            page.locator(selector).first.wait_for(state="visible")
        except Exception:  # noqa: BLE001
            pytest.fail(f"{SOLUTION}: no visible {what} ({selector!r}) drawn by the embed manager\n"
                        + "\n".join(visit.problems(site.blocked.get(SOLUTION, []))))
    # the interact's Output widget shows the saved matplotlib figure
    image = page.locator(".widget-output img").first
    image.wait_for(state="visible")
    assert image.evaluate("img => img.complete && img.naturalWidth > 0"), f"{SOLUTION}: the Output widget's image did not load"
    site.assert_clean(visit)


def test_colab_launch_link(site):
    visit = site.open(LAB)
    expected = expected_colab_url("labs/01a-attention-and-gpt.ipynb")
    hrefs = visit.page.locator("a[href*='colab.research.google.com']").evaluate_all("els => els.map(e => e.href)")
    assert expected in hrefs, f"{LAB}: no Colab launch link to {expected}; Colab links found: {hrefs}"
    site.assert_clean(visit)


def test_screenshots(site):
    toc = _load_yaml("_toc.yml")
    shots = {
        "intro": _html_name(toc["root"]),
        "chapter": CHAPTER,
        "lab": LAB,
        "solution": SOLUTION,
        "bibliography": "bibliography.html",
    }
    for name, path in shots.items():
        out = site.screenshot(site.open(path), name)
        assert out.stat().st_size > 10_000, f"{out}: suspiciously small screenshot of {path}"
