"""Backends run rendered tasks: `local` (the embedded default) and `skypilot` (managed cloud jobs)."""
