"""transformer (skeleton)."""
