"""apdb wing."""
