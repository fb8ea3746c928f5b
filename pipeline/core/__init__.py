"""The stage protocol, the runner that plans and runs a stage's jobs, and the Ray cluster they run on."""
