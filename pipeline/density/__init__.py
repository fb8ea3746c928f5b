"""Concept density: spaCy nouns of a text, the density of one file, and PixArt-α's Table-1 figures."""
