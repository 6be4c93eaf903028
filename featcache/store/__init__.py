"""The HDF5 feature store: one file per extraction, fingerprinted, written as shards into a
preallocated temporary store and published by one rename (``writer``), read without
touching features until they are asked for (``reader``). ``format`` holds what both share.
"""

from featcache.store.format import DTYPES, FORMAT, fingerprint, first_difference, storage_dtype
from featcache.store.reader import (
    Features,
    Split,
    Store,
    as_float32,
    attention_path,
    open_store,
    result_path,
    zeroshot_path,
)
from featcache.store.writer import ShardedWriter, SplitLayout

__all__ = [
    "DTYPES",
    "FORMAT",
    "Features",
    "ShardedWriter",
    "Split",
    "SplitLayout",
    "Store",
    "as_float32",
    "attention_path",
    "fingerprint",
    "first_difference",
    "open_store",
    "result_path",
    "storage_dtype",
    "zeroshot_path",
]
