"""Configs, table schemas and the dataset-root layout: the contracts every stage shares.

This package imports nothing else of densecurate.
"""
