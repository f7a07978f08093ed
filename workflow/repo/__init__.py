"""repo wing."""
