"""Ray job entrypoint: run a pipeline spec (all stages, or ``--stage NAME`` for one).

    python -m jobs.pipeline_job --spec NAME [--spec-path PATH] [--stage NAME ...]

The resolved spec itself travels as JSON in the job's environment (``SPEC_ENV``), so the job's log shows
the spec's name and file, not its encoding; ``--spec-b64`` (the spec's JSON in base64) is still read.
`densecurate submit` builds this command; inside a Ray job the driver joins the job's cluster.
"""

from __future__ import annotations

import argparse
import base64
import json
import os

from jobs.steps import run_pipeline
from schemas.errors import ConfigError
from schemas.pipeline_spec import STAGES, PipelineSpec

SPEC_ENV = "DENSECURATE_SPEC_JSON"


def decode_spec(blob: str) -> PipelineSpec:
    return PipelineSpec.model_validate(json.loads(base64.b64decode(blob)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="the spec's name (shown in the log)")
    parser.add_argument("--spec-path", help="the spec's file on the submitting machine (shown in the log)")
    parser.add_argument("--spec-b64", help="the spec's JSON in base64, instead of the environment")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    args = parser.parse_args()
    if args.spec_b64:
        spec = decode_spec(args.spec_b64)
    elif SPEC_ENV in os.environ:
        spec = PipelineSpec.model_validate_json(os.environ[SPEC_ENV])
    else:
        raise ConfigError(f"no spec: set {SPEC_ENV} or pass --spec-b64")
    print(f"spec {spec.name}" + (f" from {args.spec_path}" if args.spec_path else ""), flush=True)
    run_pipeline(spec, only=args.stage)


if __name__ == "__main__":
    main()
