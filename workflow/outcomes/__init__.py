"""outcomes wing."""
