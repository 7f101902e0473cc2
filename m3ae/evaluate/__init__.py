"""Embeddings and probes of a trained M3AE: `embed`, `probe`, the cross-modal and zero-shot
evaluations, and the periodic probe hook."""
