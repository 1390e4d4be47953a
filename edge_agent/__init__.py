"""edge-agent: polls industrial devices, buffers every reading, forwards signed batches."""

__version__ = "0.1.0"
