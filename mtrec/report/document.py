"""A report as a list of blocks, rendered twice: one self-contained HTML file and a Markdown file.

Both renderings come from the same blocks, so they say the same thing. HTML embeds every figure as a
base64 PNG (the file opens from disk, without a server); Markdown links the same PNGs, written
beside it in ``report_files/``.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from mtrec.files import write_bytes_atomic, write_text_atomic


@dataclass
class Heading:
    level: int
    text: str
    anchor: str | None = None


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    id: str | None = None
    caption: str | None = None


@dataclass
class Image:
    name: str  # file name stem in report_files/
    png: bytes
    alt: str


@dataclass
class Pre:
    text: str


Block = Heading | Para | Bullets | Table | Image | Pre


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #1d1d1f; background: #ffffff; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #3a6ea5; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.88em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th { background: #e8eef6; }
td:first-child, th:first-child, td.text { text-align: left; }
tr:nth-child(even) td { background: #f6f8fb; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
pre { background: #f4f4f4; padding: .8em; overflow-x: auto; font-size: 0.85em; }
.toc a { margin-right: 1em; }
"""


def _is_number(text: str) -> bool:
    head = text.strip().split(" ")[0].lstrip("+-−")
    return bool(head) and (head[0].isdigit() or head.startswith("."))


def render_html(doc: Document) -> str:
    """One self-contained HTML page (inline CSS, figures as data: URIs)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for b in doc.blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            tid = f' id="{html.escape(b.id)}"' if b.id else ""
            rows = [f"<table{tid}>"]
            if b.caption:
                rows.append(f"<caption>{html.escape(b.caption)}</caption>")
            rows.append(
                "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.headers) + "</tr></thead><tbody>"
            )
            for r in b.rows:
                cells = "".join(
                    f"<td>{html.escape(c)}</td>"
                    if _is_number(c) or i == 0
                    else f'<td class="text">{html.escape(c)}</td>'
                    for i, c in enumerate(r)
                )
                rows.append(f"<tr>{cells}</tr>")
            rows.append("</tbody></table>")
            out.append("\n".join(rows))
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Pre):
            out.append(f"<pre>{html.escape(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, files_dir: str = "report_files") -> str:
    """Markdown; figures are linked as ``files_dir/<name>.png`` (see :func:`write_document`)."""
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {i}" for i in b.items] + [""]
        elif isinstance(b, Table):
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "---|" * len(b.headers))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({files_dir}/{b.name}.png)", ""]
        elif isinstance(b, Pre):
            out += ["```", b.text, "```", ""]
    return "\n".join(out)


def write_document(doc: Document, folder: Path, stem: str = "report") -> dict[str, Path]:
    """Write ``folder/<stem>.html``, ``folder/<stem>.md`` and the Markdown's PNGs (each file atomically)."""
    folder = Path(folder)
    files = f"{stem}_files"
    for b in doc.blocks:
        if isinstance(b, Image):
            write_bytes_atomic(folder / files / f"{b.name}.png", b.png)
    html_path, md_path = folder / f"{stem}.html", folder / f"{stem}.md"
    write_text_atomic(md_path, render_markdown(doc, files))
    write_text_atomic(html_path, render_html(doc))
    return {"html": html_path, "md": md_path}
