"""Forwarding sealed batches to the broker."""
