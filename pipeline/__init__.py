"""Sources, the per-shard stage runner on Ray, the DuckDB catalog and the CLI."""
