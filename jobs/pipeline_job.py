"""Ray job entrypoint: run a pipeline spec (all stages, or ``--stage NAME`` for one).

    python -m jobs.pipeline_job --spec-b64 <base64 JSON of a resolved spec> [--stage NAME ...]

`densecurate submit` builds this command; inside a Ray job the driver joins the job's cluster.
"""

from __future__ import annotations

import argparse
import base64
import json

from jobs.steps import run_pipeline
from schemas.pipeline_spec import STAGES, PipelineSpec


def encode_spec(spec: PipelineSpec) -> str:
    return base64.b64encode(spec.model_dump_json().encode()).decode()


def decode_spec(blob: str) -> PipelineSpec:
    return PipelineSpec.model_validate(json.loads(base64.b64decode(blob)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec-b64", required=True)
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    args = parser.parse_args()
    run_pipeline(decode_spec(args.spec_b64), only=args.stage)


if __name__ == "__main__":
    main()
