"""The PixArt-α alignment stage: feature extraction (VAE + T5) and the diffusion objective.

Imports ``schemas`` only; the features stage in ``pipeline`` runs the encoders per shard on Ray.
"""
