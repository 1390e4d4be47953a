"""Sealing: readings become signed, compressed batches (and back, for verification)."""
