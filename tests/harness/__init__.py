"""Test harnesses that need more than a fixture: the fake cloud providers behind a real proxy (proxy.py)."""
