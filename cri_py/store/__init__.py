"""Metadata store: tinydb tables on crash-safe storage, and name reservation."""

from cri_py.store.db import NameRegistrar, Store, Table
from cri_py.store.storage import atomic_write

__all__ = ["NameRegistrar", "Store", "Table", "atomic_write"]
