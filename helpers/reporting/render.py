"""Markdown into pages: the paper's HTML (:func:`render_html`), the talk's slides as HTML, one
1280×720 page per slide (:func:`render_slides_html`), and both printed to PDF by headless
Chromium (:func:`render_pdfs`) only when their source changed, with their page counts.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from helpers.core import runtime
from helpers.core.errors import InputError
from helpers.core.files import sha256_file
from helpers.reporting.prose import TITLE


def render_html(markdown_text: str, title: str) -> str:
    import mistune

    body = mistune.create_markdown(plugins=["table"], escape=False)(markdown_text)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n<style>body{{font-family:'
        f"sans-serif;max-width:72em;margin:auto}} table{{border-collapse:collapse;font-size:90%}} td,th{{border:"
        f"1px solid #ccc;padding:2px 6px}} img{{max-width:100%}}</style></head><body>\n{body}</body></html>\n"
    )


# A slide: 1280×720 CSS px (a 16:9 page), text no smaller than MIN_FONT_PX (14 pt), its title on
# top, and one figure filling the free area under it (object-fit: contain: the whole figure, as
# large as the area allows) or a short list; the tag naming the data sits in the bottom margin.
SLIDE_SIZE = (1280, 720)
MIN_FONT_PX = 18.5  # 14 pt = 18.67 px; .5 px of rounding
MIN_FIGURE_SCALE = 0.6  # a figure is drawn at least this share of min(its own width, the slide's)
SLIDE_CSS = (
    "@page{size:1280px 720px;margin:0} html,body{margin:0} body{font-family:sans-serif;color:#1a1a1a} "
    "section{position:relative;box-sizing:border-box;width:1280px;min-height:720px;padding:22px 56px 40px;"
    "display:flex;flex-direction:column;break-after:page;font-size:24px;line-height:1.3} "
    "section:last-child{break-after:auto} h1{font-size:46px;line-height:1.2;margin:150px 0 20px} "
    "h2{font-size:34px;line-height:1.15;margin:0 0 10px;color:#1f3b73} p{margin:6px 0} "
    "ul{margin:6px 0;padding-left:1.3em} li{margin:4px 0} li ul{margin:2px 0} "
    "table{border-collapse:collapse;font-size:22px;margin:10px auto} td,th{border:1px solid #bbb;padding:4px 12px} "
    "code{font-size:.85em} h2 code,pre code,.tag code{font-size:inherit} "
    "pre{margin:8px 0;white-space:pre-wrap;font-size:21px;line-height:1.35} "
    # a slide without a figure: its list or table larger, to fill the slide
    "section:not(:has(.figure)) ul{font-size:28px} section:not(:has(.figure)) li{margin:10px 0} "
    "section:not(:has(.figure)) table{font-size:26px} section:not(:has(.figure)) h2{margin-bottom:auto} "
    "section:not(:has(.figure)) > :nth-last-child(1 of :not(.tag)){margin-bottom:auto} "
    # a figure fills the free area, whole (contain), and never less than 300 px tall
    ".figure{position:relative;flex:1 1 0;min-height:300px;margin:2px 0} "
    ".figure img{position:absolute;left:0;top:0;width:100%;height:100%;object-fit:contain} "
    ".note{color:#555;font-style:italic} .tag{position:absolute;right:24px;bottom:8px;margin:0;font-size:19px;"
    "padding:1px 10px;background:#fff3cd;border:1px solid #d9a400;border-radius:4px}"
)
_FIGURE = re.compile(r"<p>(<img [^>]*>)</p>")  # a figure alone on its line, as mistune writes it
_FIGURE_BOX = r'<div class="figure">\1</div>'


def render_slides_html(deck: list[str], title: str) -> str:
    """One ``<section>`` per slide on a 1280×720 page, a figure alone on its line filling the
    slide's free area; a slide too long for its page runs onto a second one, which
    :func:`pdf_pages` then counts and :func:`slide_layout` measures."""
    import mistune

    markdown = mistune.create_markdown(plugins=["table"], escape=False)
    sections = "\n".join(f"<section>\n{_FIGURE.sub(_FIGURE_BOX, markdown(slide))}</section>" for slide in deck)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n'
        f"<style>{SLIDE_CSS}</style></head><body>\n{sections}\n</body></html>\n"
    )


# Per slide: its title, the height and width its content reaches (the lowest and the rightmost
# edge of any element, from the slide's top left), each figure's own and drawn size (object-fit:
# contain drawn inside its box) and the smallest font of any element holding text.
_MEASURE = """() => [...document.querySelectorAll('section')].map(section => {
  const box = section.getBoundingClientRect();
  let bottom = box.bottom, right = box.right, font = Infinity, smallest = '';
  for (const e of section.querySelectorAll('*')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) { bottom = Math.max(bottom, r.bottom); right = Math.max(right, r.right); }
    const own = [...e.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim()).map(n => n.textContent.trim());
    const size = parseFloat(getComputedStyle(e).fontSize);
    if (own.length && size < font) { font = size; smallest = own.join(' ').slice(0, 60); }
  }
  const figures = [...section.querySelectorAll('img')].map(img => {
    const nw = img.naturalWidth, nh = img.naturalHeight, w = img.clientWidth, h = img.clientHeight;
    const fit = getComputedStyle(img).objectFit;
    const scale = nw && nh ? (fit === 'contain' ? Math.min(w / nw, h / nh) : fit === 'none' ? 1 : w / nw) : 0;
    return {src: img.getAttribute('src'), native: [nw, nh], drawn: [nw * scale, fit === 'fill' ? h : nh * scale]};
  });
  const heading = section.querySelector('h1, h2');
  return {title: heading ? heading.textContent.trim() : '', height: bottom - box.top, width: right - box.left,
          figures, font, smallest};
})"""


def slide_layout(html: Path) -> list[dict]:
    """Each slide of ``html`` as headless Chromium lays it out at 1280×720 (:data:`_MEASURE`),
    through playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=runtime.CHROMIUM, args=list(runtime.CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": SLIDE_SIZE[0], "height": SLIDE_SIZE[1]})
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            page.emulate_media(media="print")
            return page.evaluate(_MEASURE)
        finally:
            browser.close()


def layout_problems(layout: list[dict]) -> list[str]:
    """What makes a slide unreadable, one line each: content taller or wider than the slide, a
    figure missing or drawn below :data:`MIN_FIGURE_SCALE` of min(its own width, the slide's),
    text smaller than :data:`MIN_FONT_PX`."""
    width, height = SLIDE_SIZE
    problems = []
    for number, slide in enumerate(layout, 1):
        name = f"slide {number} ({slide['title'][:50]!r})"
        if slide["height"] > height + 0.5:
            problems.append(f"{name}: overflows, content {slide['height']:.0f} px tall on a {height} px slide")
        if slide["width"] > width + 0.5:
            problems.append(f"{name}: overflows, content {slide['width']:.0f} px wide on a {width} px slide")
        for figure in slide["figures"]:
            native, drawn = figure["native"], figure["drawn"]
            if not native[0]:
                problems.append(f"{name}: figure {figure['src']} not found")
                continue
            least = MIN_FIGURE_SCALE * min(native[0], width)
            if drawn[0] < least - 0.5:
                problems.append(
                    f"{name}: figure {figure['src']} drawn {drawn[0]:.0f} × {drawn[1]:.0f} px, below "
                    f"{least:.0f} px wide (its own {native[0]} × {native[1]})"
                )
        if slide["font"] < MIN_FONT_PX:
            problems.append(f"{name}: text at {slide['font']:.1f} px, below {MIN_FONT_PX} px: {slide['smallest']!r}")
    return problems


def chromium_installed() -> bool:
    return Path(runtime.CHROMIUM).is_file()


def render_pdf(html: Path, pdf: Path) -> bool:
    """``pdf`` printed from ``html`` by headless Chromium, unless ``pdf`` already records the same
    source (its ``/SourceSHA256``): a rebuild leaves an unchanged PDF byte for byte. Returns
    whether it printed."""
    from pypdf import PdfReader, PdfWriter

    # Chromium's PDFs make pypdf warn of a short cross-reference trailer it repairs; not the user's concern
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    digest = sha256_file(html)
    if pdf.is_file() and PdfReader(pdf).metadata.get("/SourceSHA256") == digest:
        return False
    printed = pdf.with_suffix(".printing.pdf")
    subprocess.run(
        [
            runtime.CHROMIUM,
            *runtime.CHROMIUM_ARGS,
            "--no-pdf-header-footer",
            f"--print-to-pdf={printed}",
            html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    writer = PdfWriter(clone_from=PdfReader(printed))
    writer.metadata = {"/Title": TITLE.lstrip("# "), "/SourceSHA256": digest}  # no dates: stable bytes
    with open(printed, "wb") as handle:
        writer.write(handle)
    printed.replace(pdf)
    return True


def pdf_pages(pdf: Path) -> int:
    from pypdf import PdfReader

    return len(PdfReader(pdf).pages)


def render_pdfs(out: Path) -> list[Path]:
    """``report.pdf`` and ``slides.pdf`` beside their HTML (headless Chromium; :func:`render_pdf`)."""
    if not chromium_installed():
        raise InputError(
            f"{runtime.CHROMIUM}: not found; install Chromium (apt-get install chromium) to print the PDFs"
        )
    pdfs = []
    for name in ("report", "slides"):
        if (out / f"{name}.html").is_file():
            render_pdf(out / f"{name}.html", out / f"{name}.pdf")
            pdfs.append(out / f"{name}.pdf")
    return pdfs
