"""The report's static pages: the style, thumbnails and captions, filters, paged sheets, flag sections."""

from __future__ import annotations

from pathlib import Path

from plateflow.atomic import write_bytes_if_changed
from plateflow.flags import FLAGS
from plateflow.report.plates import _esc, FLAG_THUMBS, Plates, SHEET_SIZE, WIDE


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:17px;margin-top:28px} nav a{margin-right:8px}
nav.filters{background:#f6f6f6;padding:6px 8px;border-radius:4px} nav.filters b{margin-right:8px}
.plots{display:flex;flex-wrap:wrap;gap:16px} .plots img{border:1px solid #ddd}
figure{margin:0} figcaption{color:#555;font-size:12px;overflow-wrap:anywhere}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.sheet .wide{grid-column:span 2}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:16px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:4px}
.frame{display:flex;align-items:center;justify-content:center;height:170px;background:#f3f3f3}
.pic{position:relative;display:inline-block;line-height:0;max-width:100%}
.pic img{display:block;max-width:100%;max-height:170px;width:auto;height:auto}
.crop{position:absolute;border:2px solid #e4572e;box-sizing:border-box}
.candidate{position:absolute;border:1px dashed rgba(60,60,60,.55);box-sizing:border-box}
.plate.failed figcaption,.error{color:#b00020} .flags{color:#a04000}
.missing{width:150px;line-height:150px;text-align:center;color:#777}
.hero{display:flex;flex-wrap:wrap;gap:16px} .hero figure{width:520px}
.hero .frame{height:420px} .hero .pic img{max-height:420px}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
"""


def _page(title: str, body: str, head: str = "") -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style>{head}</head><body><h1>{_esc(title)}</h1>{body}</body></html>").encode()


def _thumb(p: Plates, i: int, outline: bool = True) -> str:
    """The plate's preview, letterboxed in its cell, its best crop outlined, linked to its page."""
    thumb = p.thumbs[i]
    box, w, h = p["crop_box"][i], p["width"][i], p["height"][i]
    crop = ""
    if outline and box and w and h:
        x0, y0, x1, y1 = box
        crop = (f'<span class="crop" title="best crop: candidate {p["best_crop_idx"][i]}, similarity '
                f'{(p["similarity"][i] or 0):.3f}" style="left:{100 * x0 / w:.2f}%;top:{100 * y0 / h:.2f}%;'
                f'width:{100 * (x1 - x0) / w:.2f}%;height:{100 * (y1 - y0) / h:.2f}%"></span>')
    img = (f'<img src="{_esc(thumb)}" alt="{_esc(p["plate_id"][i])}" loading="lazy">' if thumb
           else '<span class="missing">no preview</span>')
    return f'<a class="frame" href="{_esc(p.links[i])}"><span class="pic">{img}{crop}</span></a>'


def _caption(p: Plates, i: int) -> str:
    parts = [_link(p, i)]
    name = p.name(i)
    if name:
        parts.append(_esc(name))
    if p["width"][i]:
        parts.append(f'{p["width"][i]}×{p["height"][i]}')
    caption = " · ".join(parts)
    if p["status"][i] == "failed":
        caption += f'<br>{_esc(p["failed_step"][i] or "failed")}: {_esc(p["error"][i])}'
    elif p["quality_flags"][i]:
        caption += f'<br><span class="flags">{_esc(", ".join(p["quality_flags"][i]))}</span>'
    dup = p["duplicate_of"][i]
    if dup:
        j = p.index_of.get(dup)
        caption += f" (of {_esc(dup) if j is None else _link(p, j)})"
    return caption


def _link(p: Plates, i: int) -> str:
    return f'<a href="{_esc(p.links[i])}">{_esc(p["plate_id"][i])}</a>'


def _cell(p: Plates, i: int) -> str:
    failed = p["status"][i] == "failed"
    w, h = p["width"][i], p["height"][i]
    wide = " wide" if w and h and w >= WIDE * h else ""
    return (f'<figure class="plate {"failed" if failed else "ok"}{wide}" id="{_esc(p["plate_dir"][i])}">'
            f'{_thumb(p, i)}<figcaption>{_caption(p, i)}</figcaption></figure>')


def _pair(p: Plates, i: int) -> str:
    """A duplicate beside the plate it duplicates."""
    j = p.index_of.get(p["duplicate_of"][i])
    return f'<div class="pair">{_cell(p, i)}{_cell(p, j)}</div>' if j is not None else _cell(p, i)


def _filters(p: Plates, members: dict[str, list[int]], failed: list[int], here: str = "") -> str:
    """Links to the static page of each flag, the failed plates and the whole sheet."""
    def link(name: str, label: str, n: int) -> str:
        if name == here:
            return f"<b>{_esc(label)} ({n})</b>"
        return f'<a href="{name}-0001.html">{_esc(label)} ({n})</a>' if n else f"<span>{_esc(label)} (0)</span>"

    links = [link("sheet", "all", len(p)), link("failed", "failed", len(failed))]
    links += [link(f"flag-{f}", f, len(members[f])) for f in FLAGS]
    return f'<nav class="filters">Show: {" ".join(links)}</nav>'


def _paged(reports: Path, prefix: str, title: str, p: Plates, order: list[int], intro: str = "",
           filters: str = "", cell=_cell, grid: str = "sheet", dirty: set[int] | None = None) -> list[str]:
    """``order``'s plates on pages of ``SHEET_SIZE``: ``<prefix>-0001.html``…; their names.
    With ``dirty`` (rows), only the pages showing one of them are rendered (a pair shows two)."""
    pages = max(1, -(-len(order) // SHEET_SIZE))
    names = [f"{prefix}-{k + 1:04d}.html" for k in range(pages)]
    for k, name in enumerate(names):
        part = order[k * SHEET_SIZE:(k + 1) * SHEET_SIZE]
        if dirty is not None and (reports / name).is_file() and not _shows(p, part, dirty, cell is _pair):
            continue
        nav = " ".join(f'<a href="{n}">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>" for j, n in enumerate(names))
        body = (f'<p><a href="index.html">report</a> · page {k + 1} of {pages} · {_plates(len(order))}. '
                f'{intro}</p>{filters}<nav>{nav}</nav><div class="{grid}">{"".join(cell(p, i) for i in part)}</div>')
        write_bytes_if_changed(reports / name, _page(f"{title}, page {k + 1}", body))
    for stale in reports.glob(f"{prefix}-*.html"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    return names


def _shows(p: Plates, part: list[int], dirty: set[int], pairs: bool) -> bool:
    if not dirty.isdisjoint(part):
        return True
    return pairs and any(p.index_of.get(p["duplicate_of"][i]) in dirty for i in part)


def _plates(n: int) -> str:
    return f"{n} plate{'' if n == 1 else 's'}"


DUPLICATES = ("exact_duplicates", "near_duplicates")


def _flag_section(reports: Path, p: Plates, flag: str, members: list[int], filters,
                  dirty: set[int] | None = None) -> str:
    if not members:
        for stale in reports.glob(f"flag-{flag}-*.html"):
            stale.unlink(missing_ok=True)
        return f"<h3 id='flag-{flag}'>{flag}: none</h3>"
    pair = flag in DUPLICATES
    intro = "Each plate beside the one it duplicates." if pair else ""
    pages = _paged(reports, f"flag-{flag}", f"Plates flagged {flag}", p, members, intro,
                   filters(f"flag-{flag}"), *((_pair, "pairs") if pair else ()), dirty=dirty)
    shown = members[:FLAG_THUMBS]
    more = (f" Showing {len(shown)}; <a href='{pages[0]}'>all {len(members)}</a>." if len(members) > len(shown)
            else f" <a href='{pages[0]}'>On their own page</a>.")
    grid = (f'<p>{intro}</p><div class="pairs">{"".join(_pair(p, i) for i in shown)}</div>' if pair
            else f'<div class="sheet">{"".join(_cell(p, i) for i in shown)}</div>')
    return f"<h3 id='flag-{flag}'>{flag}: {_plates(len(members))}</h3><p>{more}</p>{grid}"
