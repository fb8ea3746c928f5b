"""What `densecurate report` and a job spec's report step do: the console report and, optionally, the page."""

from __future__ import annotations

from pathlib import Path

from pipeline.report.cascade import cascade_figures, cascade_table
from pipeline.report.compare import comparison_or_none, comparison_table
from pipeline.report.console import gather_report, print_report


def run_report(root: Path, *, html: Path | None, gallery: int, spacy_model: str) -> None:
    """Print the report (with the captioner comparison when the fields share keys, and each merged field's cascade
    figures) and, with ``html``, write the page."""
    reports = gather_report(root)
    compared = comparison_or_none(root)
    cascades = cascade_figures(root)
    print_report(root, reports, comparison_table(compared) if compared else None, [cascade_table(c) for c in cascades])
    if html:
        from pipeline.report.html import write_html_report

        write_html_report(
            root, reports, html, gallery=gallery, spacy_model=spacy_model, comparison=compared, cascades=cascades
        )
