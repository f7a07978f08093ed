"""sim wing."""
