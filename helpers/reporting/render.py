"""Markdown into pages: the paper's HTML (:func:`render_html`), the talk's slides as HTML, one
1280×720 page per slide (:func:`render_slides_html`), and both printed to PDF by headless
Chromium (:func:`render_pdfs`) only when their source changed, with their page counts.
"""

from __future__ import annotations

import logging
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


SLIDE_CSS = (
    "@page{size:1280px 720px;margin:0} body{margin:0;font-family:sans-serif} "
    "section{box-sizing:border-box;width:1280px;min-height:720px;padding:36px 60px;break-after:page;"
    "font-size:23px;line-height:1.3} section:last-child{break-after:auto} h1{font-size:46px;margin-top:150px} "
    "h2{font-size:32px;margin:0 0 16px;color:#1f3b73} ul{margin:8px 0} table{border-collapse:collapse;"
    "font-size:16px;margin:8px auto} td,th{border:1px solid #bbb;padding:3px 8px} img{max-width:100%;"
    "max-height:400px;display:block;margin:8px auto} code{font-size:90%}"
)


def render_slides_html(deck: list[str], title: str) -> str:
    """One ``<section>`` per slide on a 1280×720 page; a slide too long for its page runs onto a
    second one, which :func:`pdf_pages` then counts."""
    import mistune

    markdown = mistune.create_markdown(plugins=["table"], escape=False)
    sections = "\n".join(f"<section>\n{markdown(slide)}</section>" for slide in deck)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n'
        f"<style>{SLIDE_CSS}</style></head><body>\n{sections}\n</body></html>\n"
    )


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
