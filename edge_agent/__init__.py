"""edge-agent: polls industrial devices, buffers every reading, forwards signed batches over MQTT."""

__version__ = "0.1.0"
