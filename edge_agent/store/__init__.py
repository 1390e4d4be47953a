"""The durable buffer of sealed batches."""
