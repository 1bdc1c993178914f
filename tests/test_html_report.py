"""The HTML reports of ``inspect`` and ``explain``, rendered from a real payload and real objects.

Without a browser: the page is one self-contained file (no script, stylesheet, image or URL from
elsewhere) and everything taken from the objects is escaped.  With Debian's chromium (headless,
driven by Playwright's Python package with ``executable_path``; Playwright's own browser
download is never used): the page loads without a console error or any request besides the
file itself, shows the summary and each function's old and new code side by side, and a
screenshot is taken and checked not to be blank.  The screenshot is kept under the test's
tmp_path and, when ``XSBUILD_ARTIFACTS`` is set, copied there (CI keeps it).

Chromium or Playwright missing: the browser tests skip, unless ``XSBUILD_REQUIRE_XEN=1`` (CI),
where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.image import build_image
from tests.support.toolchain import Toolchain
from xsbuild.diff import diff_files
from xsbuild.linker import link_files

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REQUIRE_ENV = "XSBUILD_REQUIRE_XEN"
UNIT = "common/page.c"
ORIG = r"""
#include "xen.h"
static noinline int helper_a(int x) { asm volatile ( "" : "+r" (x) ); return x + 1; }
static noinline int helper_b(int x) { asm volatile ( "" : "+r" (x) ); return x + 2; }
int page_scale(int x) { return x * 3 + 7; }
int page_pick(int x) { return helper_a(x) * 2 + helper_b(x); }
int page_other(int x) { return helper_a(x) - 1; }
const char *page_name(int i) { return i > 2 ? "many" : "few"; }
int page_fence(int x)
{
    alternative("lfence", "nop; nop; nop", X86_FEATURE_LFENCE_DISPATCH);
    return x * 2;
}
"""
# The new literal holds markup: the page must show it, not interpret it.
PATCHED = (ORIG.replace("x * 3 + 7", "x * 5 + 7")
           .replace("helper_a(x) * 2", "helper_b(x) * 2")
           .replace('"many"', '"<b>lots</b> & more"')
           .replace("return x * 2;", "return x * 2 + 1;"))
CHANGED = ["page_scale", "page_pick", "page_name", "page_fence"]


@dataclass(frozen=True)
class Pages:
    inspect: Path
    explain: Path


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def pages(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Pages:
    work = tmp_path_factory.mktemp("html")
    orig = toolchain.compile_source(ORIG, UNIT)
    patched = toolchain.compile_source(PATCHED, UNIT)
    image = build_image(toolchain, {UNIT: ORIG}, work / "xen-syms")
    diff_files(orig, patched, work / "page.o")
    link_files([work / "page.o"], work / "page.livepatch", xen_syms=image.path)
    out = Pages(work / "inspect.html", work / "explain.html")
    proc = run_cli("inspect", work / "page.livepatch", "--xen-syms", image.path,
                   "--format", "html", "-o", out.inspect)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("explain", orig, patched, "--format", "html", "-o", out.explain)
    assert proc.returncode == 0, proc.stderr
    return out


# --------------------------------------------------------------------------------------------
# Without a browser


@pytest.mark.parametrize("which", ["inspect", "explain"])
def test_page_is_self_contained_and_escaped(pages: Pages, which: str):
    html = getattr(pages, which).read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|https?://", html, re.I)
    assert "<b>lots</b>" not in html
    assert "&lt;b&gt;lots&lt;/b&gt; &amp; more" in html
    assert html.index('id="summary"') < html.index('id="code"')  # summary first


# --------------------------------------------------------------------------------------------
# In Debian's chromium


def _need_browser() -> Any:
    """Playwright's sync API, or skip (fail under XSBUILD_REQUIRE_XEN=1)."""
    missing = ""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright Python package is not installed (pip install playwright)"
    if not missing and not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    if missing:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_ENV}=1 requires the browser test")
        pytest.skip(missing)
    return sync_playwright


@dataclass
class Visit:
    console: list[str]
    requests: list[str]
    failures: list[str]
    screenshot: Path


@pytest.fixture(scope="module")
def browser() -> Any:
    sync_playwright = _need_browser()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def visit(browser: Any, page_file: Path, shot: Path, check: Any) -> Visit:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = Visit([], [], [], shot)
    page.on("console", lambda m: seen.console.append(f"{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: seen.console.append(f"pageerror: {e}"))
    page.on("request", lambda r: seen.requests.append(r.url))
    page.on("requestfailed", lambda r: seen.failures.append(r.url))
    page.goto(page_file.as_uri(), wait_until="load")
    check(page)
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    artifacts = os.environ.get("XSBUILD_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    return seen


def check_inspect_page(page: Any) -> None:
    assert page.locator("#summary .card").first.is_visible()
    assert "OK" in page.locator("#summary .card").first.inner_text()
    for name in CHANGED:
        article = page.locator("article.fn", has=page.locator("h3", has_text=name)).first
        assert article.is_visible(), name
        old, new = article.locator("td.o:not(.off)"), article.locator("td.n:not(.off)")
        assert old.count() and new.count(), name
        assert old.first.is_visible() and new.first.is_visible(), name
    pick = page.locator("article.fn", has=page.locator("h3", has_text="page_pick")).first
    assert "call <common/page.c#helper_a>" in pick.locator("td.o").all_inner_texts()
    assert "call <common/page.c#helper_b>" in pick.locator("td.n").all_inner_texts()
    name = page.locator("article.fn", has=page.locator("h3", has_text="page_name")).first
    assert '"<b>lots</b> & more"' in "\n".join(name.locator("td.n").all_inner_texts())


def check_explain_page(page: Any) -> None:
    assert page.locator("#summary").is_visible()
    assert "changes found" in page.locator("#summary .card").first.inner_text()
    for name in CHANGED:
        article = page.locator("article.fn", has=page.locator("h3", has_text=name)).first
        assert article.locator(".diffnote").is_visible(), name
        assert article.locator("tr.changed").first.is_visible(), name
    scale = page.locator("article.fn", has=page.locator("h3", has_text="page_scale")).first
    first = scale.locator("tr.first")
    assert "rdi*2" in first.locator("td.o").last.inner_text()
    assert "rdi*4" in first.locator("td.n").last.inner_text()


@pytest.mark.parametrize("which", ["inspect", "explain"])
def test_page_renders_in_chromium(browser: Any, pages: Pages, which: str, tmp_path: Path):
    page_file = getattr(pages, which)
    check = check_inspect_page if which == "inspect" else check_explain_page
    seen = visit(browser, page_file, tmp_path / f"{which}-report.png", check)
    assert not seen.console, seen.console
    assert seen.requests == [page_file.as_uri()], seen.requests  # nothing but the file
    assert not seen.failures, seen.failures
    check_screenshot(seen.screenshot)


# --------------------------------------------------------------------------------------------
# PNG check (no imaging library needed)


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) pixels) of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        f, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if f == 2:  # Up, the common non-trivial filter: one pass, no per-byte indexing
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif f in (1, 3, 4):
            _unfilter(f, line, prev, channels)
        rows.append(bytes(line))
        prev = bytes(line)
    return width, height, [bytes(r) for r in rows]


def _unfilter(f: int, line: bytearray, prev: bytes, channels: int) -> None:
    """PNG filters Sub (1), Average (3) and Paeth (4), in place (PNG spec, section 9)."""
    for x in range(len(line)):
        a = line[x - channels] if x >= channels else 0
        b, c = prev[x], prev[x - channels] if x >= channels else 0
        if f == 1:
            line[x] = (line[x] + a) & 0xFF
        elif f == 3:
            line[x] = (line[x] + (a + b) // 2) & 0xFF
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF


def check_screenshot(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 20_000, f"{path}: {len(data)} bytes, too small for a report"
    width, height = check_not_blank(data)
    assert width == 1280 and height > 900, (width, height)


def check_not_blank(png: bytes) -> tuple[int, int]:
    """Decode ``png`` and fail unless it has many colours, none covering almost everything."""
    width, height, rows = decode_png(png)
    channels = len(rows[0]) // width
    colours: dict[bytes, int] = {}
    for row in rows[::7]:
        for x in range(0, len(row), channels * 3):
            px = row[x:x + 3]
            colours[px] = colours.get(px, 0) + 1
    total = sum(colours.values())
    assert len(colours) > 20, f"only {len(colours)} colours"
    assert max(colours.values()) / total < 0.95, "nearly one colour"
    return width, height


def _png(width: int, height: int, pixel: Any) -> bytes:
    """An RGB PNG of ``pixel(x, y)``, its rows cycling through filters 0-4 (to test the
    decoder against every filter, each row is filtered exactly as the PNG spec defines)."""
    raw, prev = bytearray(), bytes(width * 3)
    for y in range(height):
        line = b"".join(bytes(pixel(x, y)) for x in range(width))
        f = y % 5
        out = bytearray()
        for x in range(len(line)):
            a = line[x - 3] if x >= 3 else 0
            b, c = prev[x], prev[x - 3] if x >= 3 else 0
            pred = [0, a, b, (a + b) // 2, 0][f]
            if f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            out.append((line[x] - pred) & 0xFF)
        raw += bytes([f]) + out
        prev = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


def test_screenshot_check_decodes_every_filter_and_rejects_a_blank_page():
    def gradient(x: int, y: int) -> tuple[int, int, int]:
        return (x * 7 + y) % 256, (y * 13) % 256, (x ^ y) % 256
    width, height, rows = decode_png(_png(40, 12, gradient))
    assert (width, height) == (40, 12)
    assert rows == [b"".join(bytes(gradient(x, y)) for x in range(40)) for y in range(12)]
    with pytest.raises(AssertionError, match="only 1 colours"):
        check_not_blank(_png(120, 60, lambda x, y: (246, 248, 250)))
    with pytest.raises(AssertionError, match="nearly one colour"):
        check_not_blank(_png(120, 200, lambda x, y: gradient(x, y) if y == 0 else (0, 0, 0)))
    assert check_not_blank(_png(120, 60, gradient)) == (120, 60)
