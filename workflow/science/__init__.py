"""science wing."""
