"""m3ae package."""
