"""What a submitted job is doing, read from its log: the spec's step, the stage's progress, the last error."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The rule `run_pipeline` prints before each step: "──── SPEC: STEP ────".
STEP_RULE = re.compile(r"^─+ (?P<spec>\S+): (?P<step>\S+) ─+$")
# A progress bar line: "LABEL ━━━━╸━━━ DONE/TOTAL 0:00:12".
PROGRESS = re.compile(r"^(?P<label>\S[^━╸╺]*?) [━╸╺ ]+ (?P<done>\d+)/(?P<total>\d+)\b.*$")
# The last line of a traceback, or the CLI's one sentence.
ERROR = re.compile(r"^(?:error: |[A-Za-z_][\w.]*(?:Error|Exception|Failure): )")


@dataclass(frozen=True)
class JobView:
    """The step the job runs (or ran last), its latest progress line and its last error; None when unseen."""

    step: str | None = None
    progress: str | None = None
    last_error: str | None = None

    def lines(self) -> list[str]:
        """``step: ...``, ``progress: ...``, ``last error: ...``: the ones known."""
        shown = [("step", self.step), ("progress", self.progress), ("last error", self.last_error)]
        return [f"{name}: {value}" for name, value in shown if value]


def job_view(log: str) -> JobView:
    """Read the job's log from the end: its latest step rule, the latest progress line of that step, and the
    latest error line anywhere."""
    step = progress = last_error = None
    for raw in reversed(log.splitlines()):
        line = raw.strip()
        if last_error is None and ERROR.match(line):
            last_error = line
        if step is None and (rule := STEP_RULE.match(line)):
            step = rule["step"]
        if step is None and progress is None and (bar := PROGRESS.match(line)):
            progress = f"{bar['label'].strip()} {bar['done']}/{bar['total']}"
        if step is not None and last_error is not None:
            break
    return JobView(step, progress, last_error)
