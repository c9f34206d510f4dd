"""Shared by every layer: config, files, output folders, tokens, lineage, redaction, progress."""
