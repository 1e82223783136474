"""Metadata store: tinydb tables on crash-safe storage, and name reservation."""
