"""The VLM auto-labeler: LLaVA-family model loading, prompts, batched generation, caption checks.

Imports ``schemas`` only; the caption stage in ``pipeline`` runs it per shard on Ray.
"""
