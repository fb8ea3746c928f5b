"""Noun extraction (the score stage's spaCy step) in captions/s per core, against two baselines run alongside.

    python bench/score_bench.py [--limit N] [--full-limit 1000] [--dense FILE.jsonl ... [--field NAME]]

Corpora: real dense captions (by default every JSONL under the benchmark data's dense_captions, see
docs/BENCHMARK_DATA.md: the IIW, IIW-P5B and DOCCI fields of iiw/*.jsonl, and the `detail` answers of
llava/*.jsonl), interleaved across files and fields so that --limit keeps a mix; and short alt texts,
which are derived from those captions (there is no alt-text corpus on disk): the first 6 to 12 words
(cycling) of each caption's first sentence.

Methods, on each corpus:
  * baseline "full pipeline": spacy.load without exclusions, one nlp(text) call per caption, 1 process.
    It is the slowest, so by default it is timed on the first --full-limit captions only; its rate (and every
    ratio against it) is then an extrapolation from that subset, marked with * in the table.
  * baseline "tagging only": the same exclusions as pipeline.density.nouns (tok2vec, tagger, attribute_ruler,
    lemmatizer), a plain nlp.pipe with batch 256, no de-duplication; 1 and 2 processes.
  * densecurate's NounExtractor (pipeline.density.nouns), 1 and 2 processes.
Nouns are taken from each Doc by the same rule everywhere. The 2-process rows use a ProcessPoolExecutor whose
workers load their model once (in an initializer, warmed up before timing) and take chunks of ~256 captions.

Columns: "vs full pipeline" is captions/s over the full-pipeline baseline's captions/s (1 process);
"vs tagging only (per core)" is captions/s per core over the tagging-only baseline's, at the same number of
processes. Targets (from the issue): NounExtractor >= 3x the full pipeline, no slower per core than tagging
only, and >= 1.7x its own 1-process rate on 2 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import Any

from bench_data import bench_data
from rich.console import Console
from rich.table import Table

from pipeline.density.nouns import NOT_NEEDED, NOUN_POS, NounExtractor, TextNouns, load_spacy
from schemas.score_config import NounSettings

DENSE_DIR = bench_data("dense_captions")
DEFAULT_FIELDS = ("IIW", "IIW-P5B", "DOCCI", "output")  # iiw/*.jsonl; llava/*.jsonl (rows with type == detail)
CHUNK = 256
WARMUP = "A warm-up caption: a brown dog sleeps on a red sofa next to two white cushions."
FIRST_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

FULL = "full pipeline, nlp(text) each (baseline)"
TAGGING = "tagging only, nlp.pipe (baseline)"
OURS = "densecurate NounExtractor"
SHORT = {FULL: "full pipeline", TAGGING: "tagging only", OURS: "NounExtractor"}


# ---------------------------------------------------------------- corpora


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def dense_captions(files: Sequence[Path], fields: Sequence[str]) -> list[str]:
    """Non-empty string ``fields`` of every row, one source per (file, field), interleaved round-robin."""
    sources: list[list[str]] = []
    for path in files:
        by_field: dict[str, list[str]] = {f: [] for f in fields}
        for row in read_jsonl(path):
            if row.get("type", "detail") != "detail":  # LLaVA's conv/complex answers are not captions
                continue
            for f in fields:
                value = row.get(f)
                if isinstance(value, str) and value.strip():
                    by_field[f].append(value.strip())
        sources.extend(texts for texts in by_field.values() if texts)
    return [t for group in zip_longest(*sources) for t in group if t is not None]


def alt_text(caption: str, i: int) -> str:
    """A short alt text made from a dense caption: the first 6-12 words of its first sentence."""
    first = FIRST_SENTENCE_END.split(caption, maxsplit=1)[0]
    return " ".join(first.split()[: 6 + i % 7]).rstrip(",;:")


# ---------------------------------------------------------------- methods


def doc_nouns(doc: Any, pos: frozenset[str]) -> TextNouns:
    """Nouns of a Doc by NounExtractor's rule (words without spaces/punctuation; NOUN/PROPN lemmas, lower-cased)."""
    words = [t for t in doc if not (t.is_space or t.is_punct)]
    lemmas = (t.lemma_.lower() for t in words if t.pos_ in pos)
    return TextNouns(n_tokens=len(words), nouns=tuple(lemma for lemma in lemmas if any(c.isalpha() for c in lemma)))


def full_loop(nlp: Any, pos: frozenset[str], texts: Sequence[str]) -> list[TextNouns]:
    return [doc_nouns(nlp(t), pos) for t in texts]


def tagging_pipe(nlp: Any, pos: frozenset[str], batch_size: int, texts: Sequence[str]) -> list[TextNouns]:
    return [doc_nouns(doc, pos) for doc in nlp.pipe(texts, batch_size=batch_size)]


def make_method(method: str, settings: NounSettings) -> Callable[[Sequence[str]], list[TextNouns]]:
    """A loaded, warmed-up ``texts -> nouns`` function (model loading is never timed)."""
    import spacy

    pos = NOUN_POS[settings.nouns]
    if method == FULL:
        fn = partial(full_loop, spacy.load(settings.spacy_model), pos)
    elif method == TAGGING:
        nlp = spacy.load(settings.spacy_model, exclude=NOT_NEEDED)
        fn = partial(tagging_pipe, nlp, pos, settings.batch_size)
    else:
        fn = NounExtractor(settings, nlp=load_spacy(settings.spacy_model)).extract
    fn([WARMUP, WARMUP.upper()])
    return fn


_WORKER: Callable[[Sequence[str]], list[TextNouns]] | None = None


def _init_worker(method: str, settings: NounSettings) -> None:
    global _WORKER
    _WORKER = make_method(method, settings)


def _run_chunk(chunk: list[str]) -> list[TextNouns]:
    assert _WORKER is not None
    return _WORKER(chunk)


def _ready() -> int:
    time.sleep(0.3)  # long enough that each worker takes one of these
    return os.getpid()


def chunks(texts: list[str], size: int, processes: int) -> list[list[str]]:
    """Near-equal chunks of at most ``size`` (the last one does not leave a worker idle), 2+ per process."""
    n = max(2 * processes, -(-len(texts) // size))
    step = -(-len(texts) // n)
    return [texts[i : i + step] for i in range(0, len(texts), step)]


@dataclass
class Row:
    corpus: str
    method: str
    processes: int
    captions: int
    seconds: float
    nouns: list[TextNouns]
    subset: bool = False

    @property
    def rate(self) -> float:
        return self.captions / self.seconds

    @property
    def per_core(self) -> float:
        return self.rate / self.processes


def time_serial(method: str, settings: NounSettings, texts: list[str]) -> tuple[float, list[TextNouns]]:
    fn = make_method(method, settings)
    started = time.perf_counter()
    found = fn(texts)
    return time.perf_counter() - started, found


def time_pool(method: str, settings: NounSettings, texts: list[str], processes: int) -> tuple[float, list[TextNouns]]:
    with ProcessPoolExecutor(processes, initializer=_init_worker, initargs=(method, settings)) as pool:
        pids: set[int] = set()
        while len(pids) < processes:  # every worker has loaded and warmed its model
            pids.update(f.result() for f in [pool.submit(_ready) for _ in range(processes)])
        started = time.perf_counter()
        found = [n for part in pool.map(_run_chunk, chunks(texts, CHUNK, processes)) for n in part]
        return time.perf_counter() - started, found


def bench_corpus(corpus: str, texts: list[str], settings: NounSettings, full_limit: int) -> list[Row]:
    rows = []
    subset = texts[:full_limit] if 0 < full_limit < len(texts) else texts
    seconds, found = time_serial(FULL, settings, subset)
    rows.append(Row(corpus, FULL, 1, len(subset), seconds, found, subset=len(subset) < len(texts)))
    for processes in (1, 2):
        for method in (TAGGING, OURS):
            if processes == 1:
                seconds, found = time_serial(method, settings, texts)
            else:
                seconds, found = time_pool(method, settings, texts, processes)
            rows.append(Row(corpus, method, processes, len(texts), seconds, found))
    return rows


def total(nouns: Sequence[TextNouns]) -> int:
    return sum(len(n.nouns) for n in nouns)


def report(corpus: str, rows: list[Row], console: Console) -> None:
    """Noun-count agreement and the issue's targets, for one corpus."""
    full = next(r for r in rows if r.method == FULL)
    tag1 = next(r for r in rows if r.method == TAGGING and r.processes == 1)
    ours = {r.processes: r for r in rows if r.method == OURS}
    tagging = {r.processes: r for r in rows if r.method == TAGGING}
    counts = ", ".join(f"{SHORT[r.method]} {r.processes}p {total(r.nouns):,}" for r in rows if r.method != FULL)
    same = all(r.nouns == tag1.nouns for r in rows if r.method != FULL)
    verdict = "identical, caption by caption" if same else "[bold red]DIFFERENT[/]"
    console.print(f"[b]{corpus}[/] nouns: {counts}: {verdict}")
    console.print(
        f"  full pipeline: {total(full.nouns):,} nouns in its {full.captions:,} captions; "
        f"tagging only: {total(tag1.nouns[: full.captions]):,} in the same captions "
        f"({sum(a != b for a, b in zip(full.nouns, tag1.nouns, strict=False)):,} captions differ)"
    )

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]missed[/]"

    vs_full = ours[1].rate / full.rate
    per_core = {p: ours[p].per_core / tagging[p].per_core for p in ours}
    scaling = ours[2].rate / ours[1].rate
    console.print(
        f"  targets: {vs_full:.2f}x full pipeline{'*' if full.subset else ''} (>= 3x) {mark(vs_full >= 3)}; "
        + "; ".join(f"{per_core[p]:.2f}x tagging only per core at {p}p (>= 1x) {mark(per_core[p] >= 1)}" for p in ours)
        + f"; {scaling:.2f}x on 2 processes vs 1 (>= 1.7x) {mark(scaling >= 1.7)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, nargs="+", help=f"JSONL files of dense captions (default: {DENSE_DIR})")
    parser.add_argument(
        "--field", action="append", help=f"text field of the --dense rows, repeatable (default: {DEFAULT_FIELDS})"
    )
    parser.add_argument("--limit", type=int, default=0, help="use at most N captions per corpus (default: all)")
    parser.add_argument(
        "--full-limit",
        type=int,
        default=1000,
        help="time the full-pipeline baseline on at most N captions and extrapolate its rate (0: all)",
    )
    parser.add_argument("--spacy-model", default=NounSettings().spacy_model)
    args = parser.parse_args()

    files = [p for p in args.dense or sorted(DENSE_DIR.rglob("*.jsonl")) if p.is_file()]
    origin = ", ".join(str(p) for p in args.dense) if args.dense else str(DENSE_DIR)
    dense = dense_captions(files, args.field or DEFAULT_FIELDS) if files else []
    if not dense:
        sys.exit(
            f"No dense captions found in {origin} (fields {args.field or DEFAULT_FIELDS}); "
            "pass --dense FILE.jsonl [--field NAME]."
        )
    if args.limit > 0:
        dense = dense[: args.limit]
    alts = [alt_text(c, i) for i, c in enumerate(dense)]
    settings = NounSettings(spacy_model=args.spacy_model)

    console = Console(width=160)
    rows: list[Row] = []
    words = {}
    for corpus, texts in (("dense", dense), ("alt text", alts)):
        words[corpus] = sum(len(t.split()) for t in texts) / len(texts)
        corpus_rows = bench_corpus(corpus, texts, settings, args.full_limit)
        report(corpus, corpus_rows, console)
        rows.extend(corpus_rows)

    table = Table(
        title=f"Noun extraction, spaCy {settings.spacy_model}, {os.cpu_count()} CPUs. dense: captions from {origin} "
        f"({words['dense']:.0f} words avg); alt text: first 6-12 words of each one's first sentence "
        f"({words['alt text']:.0f} words avg; no alt-text corpus on disk)",
        caption="* timed on the first captions only (interleaved across sources); rate extrapolated to the corpus"
        if any(r.subset for r in rows)
        else None,
    )
    columns = ("corpus", "method", "processes", "captions", "seconds", "captions/s", "captions/s per core")
    for col in (*columns, "vs full pipeline", "vs tagging only (per core)"):
        table.add_column(col, justify="left" if col in ("corpus", "method") else "right")
    for r in rows:
        full = next(b for b in rows if b.corpus == r.corpus and b.method == FULL)
        tagging = next(b for b in rows if b.corpus == r.corpus and b.method == TAGGING and b.processes == r.processes)
        star = "*" if full.subset else ""
        table.add_row(
            r.corpus,
            r.method,
            str(r.processes),
            f"{r.captions:,}{'*' if r.subset else ''}",
            f"{r.seconds:.2f}",
            f"{r.rate:,.1f}",
            f"{r.per_core:,.1f}",
            f"{r.rate / full.rate:.2f}x{star}",
            f"{r.per_core / tagging.per_core:.2f}x",
        )
    console.print(table)


if __name__ == "__main__":
    main()
