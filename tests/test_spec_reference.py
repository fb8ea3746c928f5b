"""docs/JOB_SPEC.md is the reference `python -m densecurate.spec_reference` writes, and it names real options."""

from __future__ import annotations

from pathlib import Path

from densecurate.spec_reference import spec_reference

REPO = Path(__file__).resolve().parents[1]


def test_the_job_spec_reference_in_docs_is_current():
    assert (REPO / "docs" / "JOB_SPEC.md").read_text() == spec_reference(), (
        "regenerate it: python -m densecurate.spec_reference > docs/JOB_SPEC.md"
    )


def test_the_reference_pairs_keys_with_their_options():
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in spec_reference().splitlines()[9:]}
    assert rows["shard.image.resize"][2:4] == ["`512`", "`--resize`"]
    assert rows["ground.duplicates.threshold"][3] == "`--dup-threshold`"
    assert rows["caption[].model"][3] == "—"  # a group of settings, not the --model option
    assert rows["caption[].model.model"][1:4] == ["str", "required", "`--model`"]
    assert rows["export.ema"][2] == "`True`"
    assert "0x" not in spec_reference()  # nothing that changes from run to run
