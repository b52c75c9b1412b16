"""Datasets (placeholder; filled in below)."""
