"""Ray job entrypoints: the whole pipeline or one stage of a spec, and the Job Submission API wrapper."""
