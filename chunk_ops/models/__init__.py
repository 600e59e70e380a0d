"""Networks bundled with chunk_ops and the loaders for the supported model formats."""
