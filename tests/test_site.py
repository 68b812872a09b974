"""Real-browser test of the built book: every page works offline; math, mermaid, widgets and explorers
render; an explorer responds; the Colab buttons open notebooks of the repository.

`make test` builds the book first (`make book`), then runs this against `_build/html`, served
over http://127.0.0.1 by a local http.server. Debian's chromium is driven by Playwright. Every
request that leaves 127.0.0.1 is blocked *and* counts as a failure, which proves the site needs
no network (no CDN). One full-page screenshot per page type goes to `_build/screenshots/`.

Environment (to run it on another build, e.g. a scratch book):
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
from playwright.sync_api import Error as PlaywrightError
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
EXPLORER_PAGE = "chapters/03-position-encodings.html"
SOLUTION = "solutions/01a-attention-and-gpt.html"
TIMEOUT_MS = 20_000  # for any one thing to appear on a page


def _load_yaml(name: str) -> dict:
    with open(BOOK_DIR / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _html_name(file: str) -> str:
    for suffix in (".md", ".ipynb", ".rst"):
        if file.endswith(suffix):
            file = file[: -len(suffix)]
    return file + ".html"


def toc_pages() -> list[str]:
    """index.html (jupyter-book's redirect), the root page and every `file` entry of _toc.yml."""
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
    """The Colab link sphinx-book-theme should make, from _config.yml's repository section."""
    cfg = _load_yaml("_config.yml")
    repo = cfg["repository"]
    owner_name = urlsplit(repo["url"]).path.strip("/").removesuffix(".git")
    book = (repo.get("path_to_book") or "").strip("/")
    colab = ((cfg.get("launch_buttons") or {}).get("colab_url") or "https://colab.research.google.com").rstrip("/")
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
        # none, and that 404 (a console error) is no fault of the pages.
        if self.path.split("?")[0] == "/favicon.ico" and not (Path(self.directory) / "favicon.ico").exists():
            self.send_response(204)
            self.end_headers()
            return None
        return super().send_head()


# JavaScript run in the page: what is still not rendered (a list of descriptions; empty = done).
_NOT_RENDERED_JS = """() => {
  const out = [];
  const short = (e) => e.outerHTML.slice(0, 120).replace(/\\s+/g, " ");
  for (const e of document.querySelectorAll("span.math, div.math"))
    if (!e.querySelector("mjx-container")) out.push("math not typeset by MathJax: " + short(e));
  for (const e of document.querySelectorAll("pre.mermaid, div.mermaid"))
    if (!e.querySelector("svg")) out.push("mermaid diagram not drawn: " + short(e));
  for (const s of document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')) {
    const view = s.previousElementSibling;
    if (!view || !view.classList.contains("widget-subarea") || !view.firstElementChild)
      out.push("widget not drawn by the embed manager: " + s.textContent.slice(0, 120));
  }
  return out;
}"""

# ... and what was rendered as an error.
_RENDER_ERRORS_JS = """() => {
  const out = [];
  for (const e of document.querySelectorAll("mjx-merror"))
    out.push("TeX error: " + (e.getAttribute("data-mjx-error") || e.textContent).slice(0, 200));
  for (const e of document.querySelectorAll(".mermaid svg[aria-roledescription='error']"))
    out.push("mermaid syntax error: " + e.closest(".mermaid").getAttribute("data-original-code"));
  for (const e of document.querySelectorAll(".jupyter-widgets-error-widget"))
    out.push("widget error: " + e.textContent.slice(0, 200));
  return out;
}"""


@dataclass
class Visit:
    """One opened page and everything that went wrong on it (it keeps listening while open)."""

    path: str
    page: object
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    render_problems: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return (
            [f"request to outside the site (blocked): {u}" for u in self.blocked]
            + [f"HTTP error: {r}" for r in self.bad_responses]
            + [f"request failed: {r}" for r in self.failed_requests]
            + [f"console error: {m}" for m in self.console_errors]
            + [f"uncaught exception: {m}" for m in self.page_errors]
            + self.render_problems
        )

    def report(self) -> str:
        return f"{self.path}:\n  " + "\n  ".join(self.problems() or ["(no errors recorded)"])


class Site:
    def __init__(self, base: str, context):
        self.base = base
        self.context = context
        self.visits: dict[str, Visit] = {}
        self._loading: Visit | None = None
        context.route("**/*", self._route)

    def _route(self, route):
        request = route.request
        if urlsplit(request.url).hostname == "127.0.0.1":
            route.continue_()
            return
        visit = self._loading
        try:
            page = request.frame.page
            visit = next((v for v in self.visits.values() if v.page == page), visit)
        except PlaywrightError:  # a request with no frame (e.g. from a worker)
            pass
        if visit is not None:
            visit.blocked.append(request.url)
        route.abort("blockedbyclient")

    def open(self, path: str) -> Visit:
        """Open a page (once; later calls return the same Visit) and let it finish rendering."""
        if path in self.visits:
            return self.visits[path]
        page = self.context.new_page()
        visit = Visit(path, page)
        self.visits[path] = visit
        self._loading = visit

        def on_console(msg):
            if msg.type == "error":
                visit.console_errors.append(f"{msg.text} [at {msg.location.get('url') or '?'}]")

        def on_response(response):
            if response.url.startswith(self.base) and response.status >= 400:
                visit.bad_responses.append(f"{response.status} {response.url}")

        def on_failed(request):
            if request.url.startswith(self.base):
                visit.failed_requests.append(f"{request.url} ({request.failure})")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: visit.page_errors.append(str(exc)))
        page.on("response", on_response)
        page.on("requestfailed", on_failed)

        response = page.goto(f"{self.base}/{path}", wait_until="load")
        if response is None or response.status != 200:
            visit.bad_responses.append(f"{response.status if response else 'no response'} {path} (the page itself)")
            return visit
        _settle(page)
        try:
            page.wait_for_function(f"() => ({_NOT_RENDERED_JS})().length === 0", timeout=TIMEOUT_MS)
        except PlaywrightError:
            visit.render_problems += [f"after {TIMEOUT_MS} ms: {p}" for p in page.evaluate(_NOT_RENDERED_JS)]
        visit.render_problems += page.evaluate(_RENDER_ERRORS_JS)
        _settle(page)
        return visit

    def screenshot(self, visit: Visit, name: str) -> Path:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        out = SCREENSHOT_DIR / f"{name}.png"
        visit.page.screenshot(path=str(out), full_page=True)
        return out


def _settle(page) -> None:
    """Wait for the network to go quiet. Playwright's "networkidle" now and then never fires on a page that
    has finished loading (every resource timing complete; seen on the heaviest chapter, under load), so a
    timeout here is no failure: what the page must show is checked by the render checks."""
    try:
        page.wait_for_load_state("networkidle", timeout=TIMEOUT_MS)
    except PlaywrightError:
        pass


def assert_clean(visit: Visit) -> None:
    if visit.problems():
        pytest.fail(visit.report(), pytrace=False)


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


def test_toc_pages_were_built():
    missing = [p for p in toc_pages() if not (SITE_DIR / p).is_file()]
    assert not missing, f"pages listed in {BOOK_DIR / '_toc.yml'} are missing from {SITE_DIR}: {missing}"


def test_config_extension_lists_agree():
    """_config.yml sets sphinx.config.extensions (to leave out sphinx_thebe), which replaces
    jupyter-book's whole list: an extension only under extra_extensions would be dropped."""
    sphinx = _load_yaml("_config.yml").get("sphinx") or {}
    listed = (sphinx.get("config") or {}).get("extensions")
    if listed is None:
        pytest.skip("sphinx.config.extensions is not set")
    missing = [e for e in sphinx.get("extra_extensions") or [] if e not in listed]
    assert not missing, f"_config.yml: add {missing} to sphinx.config.extensions too, or they are not loaded"


@pytest.mark.parametrize("path", toc_pages())
def test_page_loads_offline_without_errors(site, path):
    """No console error, no uncaught exception, no HTTP error, no request leaving the site,
    and all math, mermaid diagrams and widgets on the page rendered (without errors)."""
    assert_clean(site.open(path))


def _visible(page, selector: str, timeout_ms: int = 2_000) -> bool:
    """Whether `selector` is (or within a short time becomes) visible; Site.open already
    waited for the page to finish rendering, so this need not wait long."""
    try:
        page.locator(selector).first.wait_for(state="visible", timeout=timeout_ms)
        return True
    except PlaywrightError:
        return False


def test_math_is_typeset(site):
    visit = site.open(CHAPTER)
    if not _visible(visit.page, "mjx-container"):
        pytest.fail(f"{CHAPTER}: no visible mjx-container: MathJax typeset nothing.\n{visit.report()}", pytrace=False)
    errors = [p for p in visit.render_problems if "math" in p or "TeX" in p]
    assert not errors, f"{CHAPTER}: {errors}"


def test_mermaid_is_rendered(site):
    visit = site.open(CHAPTER)
    if not _visible(visit.page, ".mermaid svg"):
        pytest.fail(f"{CHAPTER}: no visible '.mermaid svg': mermaid drew nothing.\n{visit.report()}", pytrace=False)
    nodes = visit.page.locator(".mermaid svg .node").count()
    assert nodes >= 2, f"{CHAPTER}: the mermaid diagram has {nodes} nodes\n{visit.report()}"
    errors = [p for p in visit.render_problems if "mermaid" in p]
    assert not errors, f"{CHAPTER}: {errors}"


def test_explorers_respond(site):
    """An explorer on the static page redraws when a slider moves, with plotly.js from the site's own copy."""
    visit = site.open(EXPLORER_PAGE)
    page = visit.page
    title = page.locator(".labkit-explorer .gtitle").first
    title.wait_for(timeout=TIMEOUT_MS)
    before = title.text_content()
    slider = page.locator(".labkit-explorer input[type=range]").first
    slider.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("t => document.querySelector('.labkit-explorer .gtitle').textContent !== t", arg=before,
                           timeout=TIMEOUT_MS)
    assert title.text_content() != before
    assert not visit.blocked, f"{EXPLORER_PAGE}: the explorer asked for files outside the site: {visit.blocked}"
    assert_clean(visit)


@pytest.mark.parametrize("page", [CHAPTER, LAB])
def test_colab_links_open_notebooks_of_the_repository(site, page):
    """The Colab button of a chapter and of a lab opens an .ipynb that the repository has at that path."""
    hrefs = site.open(page).page.locator("a[href*='colab.research.google.com']").evaluate_all(
        "els => els.map(e => e.href)")
    assert hrefs, f"{page}: no Colab launch link"
    for href in hrefs:
        notebook = href.split("/blob/", 1)[1].split("/", 1)[1]  # after the branch
        assert href == expected_colab_url(notebook), href
        assert notebook.endswith(".ipynb") and (BOOK_DIR / notebook).is_file(), \
            f"{page}: the Colab link opens {notebook}, which is not a notebook of the repository"


def test_screenshots(site):
    shots = {
        "intro": _html_name(_load_yaml("_toc.yml")["root"]),
        "chapter": CHAPTER,
        "lab": LAB,
        "solution": SOLUTION,
        "bibliography": "bibliography.html",
    }
    for name, path in shots.items():
        out = site.screenshot(site.open(path), name)
        assert out.stat().st_size > 10_000, f"{out}: suspiciously small screenshot of {path}"
