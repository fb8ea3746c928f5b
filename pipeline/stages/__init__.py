"""One module per stage (shard, caption, score, embed, ground, curate, features): its jobs and its entry point."""
