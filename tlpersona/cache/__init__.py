"""On-disk activation store (manifest + safetensors)."""

from tlpersona.cache.reader import Store, open_store, verify_store
from tlpersona.cache.writer import StoreWriter

__all__ = ["Store", "StoreWriter", "open_store", "verify_store"]
