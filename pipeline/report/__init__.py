"""What a user reads: the console and HTML reports, the captioner comparison, stats queries and table output."""
