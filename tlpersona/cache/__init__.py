"""On-disk activation store (manifest + safetensors)."""

from tlpersona.cache.store import Store, StoreWriter, open_store, verify_store

__all__ = ["Store", "StoreWriter", "open_store", "verify_store"]
