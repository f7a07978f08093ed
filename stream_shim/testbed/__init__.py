"""testbed wing."""
