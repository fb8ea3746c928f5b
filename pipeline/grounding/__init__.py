"""Grounding: image-caption scores, grounded nouns and near-duplicate clusters from CLIP embeddings."""
