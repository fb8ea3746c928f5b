"""The dataset root on disk: shards written and read back, table metadata, the DuckDB catalog, verification,
the guards on outputs, pruning, freshness of derived tables and duplicate-key marks."""
