"""Tool helpers: the tool config registry."""
