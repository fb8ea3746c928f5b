"""The self-contained HTML report: tables, matplotlib plots and a gallery with valid and rare nouns marked."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import duckdb

from pipeline.density.nouns import NOUN_POS, load_spacy
from pipeline.report.cascade import CascadeFigures, cascade_lines, cascade_notes, cascade_title
from pipeline.report.compare import CPU_NOTE, FieldComparison, comparison_lines
from pipeline.report.console import FieldReport, table1_lines
from pipeline.store.catalog import connect, has_view, readable_list
from pipeline.store.verify import checked_samples
from schemas.atomic import write_atomic
from schemas.layout import TABLE_GLOBS
from schemas.score_config import ALT_TEXT_FIELD

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f3f3f3; }
.plots img { max-width: 48%; margin-right: 1%; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1rem; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem; min-width: 0; overflow: hidden;
        overflow-wrap: anywhere; }
.card img { max-width: 100%; max-height: 320px; display: block; margin-bottom: 0.4rem; }
.caption { max-height: 9.5em; overflow-y: auto; line-height: 1.35; }
.field { font-size: 0.8rem; color: #666; margin-top: 0.4rem; }
mark.valid { background: #b7e4c7; }
mark.rare { background: #ffd6a5; }
mark.ungrounded { text-decoration: line-through; text-decoration-color: #b00; outline: 1px dashed #b00; }
#broken-images { color: #b00; font-weight: bold; }
"""
# Shows, on the page itself, how many pictures failed to render; records whether the page scrolls sideways and
# its tallest gallery card (the tests read all three).
IMAGE_CHECK = """
window.addEventListener('load', () => {
  const broken = [...document.images].filter(img => !img.complete || img.naturalWidth === 0).length;
  document.body.dataset.brokenImages = String(broken);
  const page = document.documentElement;
  document.body.dataset.sidewaysScroll = String(page.scrollWidth > page.clientWidth);
  const cards = [...document.querySelectorAll('.card')].map(card => card.getBoundingClientRect().height);
  document.body.dataset.tallestCard = String(Math.round(Math.max(0, ...cards)));
  if (broken) document.getElementById('broken-images').textContent = broken + ' images could not be shown.';
});
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


HISTOGRAM_SHARE = 0.9  # the nouns-per-image bars cover this share of captions; the rest share the last bar


def _histogram_cap(histogram: list[tuple[int, int]]) -> int:
    """The noun count below which ``HISTOGRAM_SHARE`` of the captions lie (at least 10): a few run-on captions
    must not squeeze every other bar into one pixel."""
    total, seen = sum(c for _, c in histogram), 0
    for n, c in sorted((n or 0, c) for n, c in histogram):
        seen += c
        if seen >= HISTOGRAM_SHARE * total:
            return max(n + 1, 10)
    return 10


def _capped(histogram: list[tuple[int, int]], cap: int) -> dict[int, int]:
    """Captions per noun count, 0 to ``cap``, the counts at or above ``cap`` summed into the last."""
    counts = dict.fromkeys(range(cap + 1), 0)
    for n, c in histogram:
        counts[min(n or 0, cap)] += c
    return counts


def _plots(reports: list[FieldReport]) -> list[tuple[str, str]]:
    """(title, base64 PNG): nouns-per-image histograms and noun rank-frequency, one line per field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, ax = plt.subplots(figsize=(6, 4))
    cap = max(_histogram_cap(r.nouns_histogram) for r in reports) if reports else 0
    width = 0.8 / max(1, len(reports))
    for i, r in enumerate(reports):  # side-by-side bars: each field's share of captions with n nouns
        counts = _capped(r.nouns_histogram, cap)
        total = sum(counts.values()) or 1
        xs = [n - 0.4 + width * (i + 0.5) for n in counts]
        ax.bar(xs, [c / total for c in counts.values()], width=width, label=r.row.field)
    ax.set(xlabel=f"nouns in a caption (the last bar: {cap} or more)", ylabel="share of captions")
    ax.set_title("nouns per image")
    ax.legend()
    rank, ax2 = plt.subplots(figsize=(6, 4))
    for r in reports:
        if r.rank_counts:
            ax2.loglog(range(1, len(r.rank_counts) + 1), r.rank_counts, label=r.row.field)
    ax2.axhline(reports[0].min_count, color="grey", linestyle=":", label="min-count (valid above)")
    ax2.set(xlabel="noun rank", ylabel="occurrences", title="noun rank-frequency")
    ax2.legend()
    out = [("nouns per image", _png(hist)), ("noun rank-frequency", _png(rank))]
    plt.close(hist)
    plt.close(rank)
    return out


def _pareto_plot(compared: list[FieldComparison]) -> str:
    """Base64 PNG: valid nouns per image against GPU-seconds per caption, one point per field, the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in compared:
        marker = "o" if c.on_pareto_front else "x"
        ax.scatter(c.gpu_seconds_per_caption, c.valid_nouns_per_image, marker=marker, s=50)
        ax.annotate(
            c.field, (c.gpu_seconds_per_caption, c.valid_nouns_per_image), textcoords="offset points", xytext=(5, 5)
        )
    front = sorted((c.gpu_seconds_per_caption, c.valid_nouns_per_image) for c in compared if c.on_pareto_front)
    ax.step(
        [x for x, _ in front], [y for _, y in front], where="post", color="grey", linestyle="--", label="Pareto front"
    )
    unit = "CPU-seconds" if any(c.on_cpu for c in compared) else "GPU-seconds"
    ax.set(
        xlabel=f"{unit} per caption",
        ylabel="valid nouns per image",
        title=f"density against cost ({compared[0].keys:,} identical keys)",
    )
    ax.legend()
    png = _png(fig)
    plt.close(fig)
    return png


def _comparison_section(compared: list[FieldComparison]) -> str:
    """The captioner comparison: its table and the density-against-cost plot."""
    rows = [[name, *values] for name, values in comparison_lines(compared)]
    note = f"<p>{html.escape(CPU_NOTE)}</p>" if any(c.on_cpu for c in compared) else ""
    plot = f'<img src="data:image/png;base64,{_pareto_plot(compared)}" alt="density against cost">'
    return (
        f'<h2 id="compare">Captioners compared on {compared[0].keys:,} identical keys</h2>'
        + _table(["", *(c.field for c in compared)], rows)
        + note
        + f'<div class="plots">{plot}</div>'
    )


def _cascade_section(c: CascadeFigures) -> str:
    """A merged field against its costliest source captioning every key."""
    strong = f"{c.costliest} on every key" if c.costliest else "no source with a cost"
    rows = [list(line) for line in cascade_lines(c)]
    return (
        f'<h2 id="cascade-{html.escape(c.field)}">{html.escape(cascade_title(c))}</h2>'
        + _table(["", f"{c.field} (cascade)", strong], rows)
        + "".join(f"<p>{html.escape(note)}</p>" for note in cascade_notes(c))
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


SHOWN_NOUN_CHARS = 40  # a longer noun (a captioner's run-on token) is cut in the tables, with an ellipsis


def _shown_noun(noun: str) -> str:
    return noun if len(noun) <= SHOWN_NOUN_CHARS else noun[: SHOWN_NOUN_CHARS - 1] + "…"


def _summary_tables(reports: list[FieldReport]) -> str:
    names = [r.row.field for r in reports]
    lines = table1_lines([r.row for r in reports], [r.grounding for r in reports])
    table1 = [[name, *values] for name, values in lines]
    table1 += [
        ["nouns per image p10 / median / p90", *("{:.0f} / {:.0f} / {:.0f}".format(*r.quantiles) for r in reports)],
        ["words per caption (mean)", *(f"{r.words_mean:.1f}" for r in reports)],
        ["distinct nouns seen <= min-count times", *(f"{100 * r.tail_distinct_share:.1f}%" for r in reports)],
        ["noun occurrences from those nouns", *(f"{100 * r.tail_occurrence_share:.1f}%" for r in reports)],
    ]
    for flag in ("truncated", "repetitive", "empty"):
        table1.append([f"flagged {flag}", *(f"{100 * r.flags[flag]:.1f}%" if r.flags else "-" for r in reports)])
    depth = max((len(r.top_nouns) for r in reports), default=0)
    top = [
        [
            str(i + 1),
            *(
                f"{_shown_noun(r.top_nouns[i][0])} ({r.top_nouns[i][1]})" if i < len(r.top_nouns) else ""
                for r in reports
            ),
        ]
        for i in range(depth)
    ]
    return (
        "<h2>Concept density (PixArt-α Table 1)</h2>"
        + _table(["", *names], table1)
        + "<h2>Most frequent nouns</h2>"
        + _table(["rank", *names], top)
    )


def _gallery_samples(con: duckdb.DuckDBPyConnection, root: Path, n: int) -> list[tuple[str, str]]:
    """``(key, shard tar)`` of ``n`` written samples, picked by a hash of the key (stable across runs)."""
    shards = readable_list(con, root.resolve(), TABLE_GLOBS["samples"])
    if shards == "[]":
        return []
    rows = con.execute(
        f"SELECT key, filename FROM read_parquet({shards}, filename = true) WHERE status = 'ok' "
        "ORDER BY hash(key) LIMIT ?",
        [n],
    ).fetchall()
    return [(key, str(Path(parquet).with_suffix(".tar"))) for key, parquet in rows]


def _thumbnails(samples: list[tuple[str, str]]) -> dict[str, str]:
    from PIL import Image

    wanted = defaultdict(set)
    for key, tar in samples:
        wanted[tar].add(key)
    thumbs = {}
    for tar, keys in wanted.items():
        for key, members in checked_samples(Path(tar), keys.__contains__):
            if key in keys:
                im = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
                im.thumbnail((320, 320))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                thumbs[key] = base64.b64encode(buf.getvalue()).decode()
    return thumbs


def _captions(con: duckdb.DuckDBPyConnection, keys: list[str], fields: list[str]) -> dict[tuple[str, str], str]:
    found = {}
    if ALT_TEXT_FIELD in fields:
        for key, text in con.execute(
            "SELECT key, alt_text FROM samples WHERE list_contains(?, key)", [keys]
        ).fetchall():
            found[(ALT_TEXT_FIELD, key)] = text
    captioners = [f for f in fields if f != ALT_TEXT_FIELD]
    if captioners:
        for name, key, text in con.execute(
            "SELECT captioner, key, caption FROM captions WHERE list_contains(?, key) AND list_contains(?, captioner)",
            [keys, captioners],
        ).fetchall():
            found[(name, key)] = text
    return found


def _ungrounded(con: duckdb.DuckDBPyConnection, keys: list[str]) -> dict[tuple[str, str], set[str]]:
    """Per (field, key) of the gallery, the nouns the ground stage judged not in the image."""
    if not has_view(con, "grounding"):
        return {}
    rows = con.execute("SELECT field, key, ungrounded_nouns FROM grounding WHERE list_contains(?, key)", [keys])
    return {(f, key): set(nouns) for f, key, nouns in rows.fetchall()}


def _marked(nlp, text: str | None, valid: set[str], pos: frozenset[str], ungrounded: set[str] | None = None) -> str:
    """The caption as HTML with each noun marked valid (seen more than min-count times) or rare, and
    struck through when the ground stage judged it not in the image."""
    if not text:
        return "<em>no caption</em>"
    parts = []
    for token in nlp(text):
        word = html.escape(token.text)
        lemma = token.lemma_.lower()
        if token.pos_ in pos and any(c.isalpha() for c in token.lemma_):
            kind = "valid" if lemma in valid else "rare"
            title = lemma
            if ungrounded is not None and lemma in ungrounded:
                kind, title = f"{kind} ungrounded", f"{lemma}: not found in the image"
            word = f'<mark class="{kind}" title="{html.escape(title)}">{word}</mark>'
        parts.append(word + html.escape(token.whitespace_))
    return "".join(parts)


def _gallery(root: Path, fields: list[str], n: int, spacy_model: str) -> str:
    with connect(root) as con:
        samples = _gallery_samples(con, root, n)
        if not samples:  # no shard table reads: the report's figures stand without a gallery
            return ""
        keys = [k for k, _ in samples]
        captions = _captions(con, keys, fields)
        valid = {
            f: {w for (w,) in con.execute("SELECT noun FROM vocab WHERE field = ? AND valid", [f]).fetchall()}
            for f in fields
        }
        ungrounded = _ungrounded(con, keys)
    thumbs = _thumbnails(samples)
    nlp = load_spacy(spacy_model)
    cards = []
    for key in keys:
        body = [
            f'<img src="data:image/jpeg;base64,{thumbs[key]}" alt="{html.escape(key)}">',
            f"<b>{html.escape(key)}</b>",
        ]
        for f in fields:
            marked = _marked(nlp, captions.get((f, key)), valid[f], NOUN_POS["all"], ungrounded.get((f, key)))
            body.append(f'<div class="field">{html.escape(f)}</div><div class="caption">{marked}</div>')
        cards.append('<div class="card">' + "".join(body) + "</div>")
    legend = (
        '<p><mark class="valid">valid noun</mark> (seen more than min-count times) · '
        '<mark class="rare">rare noun</mark> · '
        '<mark class="valid ungrounded">not found in the image</mark> (`densecurate ground`)</p>'
    )
    return "<h2>Gallery</h2>" + legend + '<div class="gallery">' + "".join(cards) + "</div>"


def write_html_report(
    root: Path,
    reports: list[FieldReport],
    out: Path,
    *,
    gallery: int,
    spacy_model: str,
    comparison: list[FieldComparison] | None = None,
    cascades: Sequence[CascadeFigures] = (),
) -> Path:
    """Write the report page to ``out`` (images and plots embedded: one file, no network); with
    ``comparison``, the captioner comparison and its plot; with ``cascades``, each merged field's figures."""
    fields = [r.row.field for r in reports]
    plots = "".join(f'<img src="data:image/png;base64,{png}" alt="{html.escape(t)}">' for t, png in _plots(reports))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>densecurate report: {html.escape(str(root))}</title><style>{STYLE}</style></head>"
        f'<body><h1>densecurate report</h1><p>{html.escape(str(root))}</p><p id="broken-images"></p>'
        + _summary_tables(reports)
        + (_comparison_section(comparison) if comparison else "")
        + "".join(_cascade_section(c) for c in cascades)
        + f'<h2>Plots</h2><div class="plots">{plots}</div>'
        + _gallery(root, fields, gallery, spacy_model)
        + f"<script>{IMAGE_CHECK}</script></body></html>"
    )
    write_atomic(out, page)
    return out
