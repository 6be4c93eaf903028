"""What a store is: its format name, its fingerprint, and how a difference is named."""

from __future__ import annotations

import hashlib
import json

FORMAT = "featcache-store/1"

# How features may be stored: float32, or float16 for half the disk and memory (readers
# compute in float32).
DTYPES = ("float32", "float16")


def fingerprint(fields: dict) -> str:
    """sha256 of the canonical JSON of everything that shaped the features.

    The fields carry the version of the code that made the features (``feature_version``,
    extract.FEATURE_VERSION), so that bumping it refuses older stores and shards.
    """
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def versioned(fields: dict) -> dict:
    """Fields recorded before they carried their feature version are version 1 (the hash
    added it then: their recorded fingerprint is the same)."""
    return fields if "feature_version" in fields else {**fields, "feature_version": 1}


def first_difference(stored: dict, wanted: dict) -> str | None:
    """The first field (in the requested order) whose value differs, for an error message."""
    for key in [*wanted, *(k for k in stored if k not in wanted)]:
        a, b = stored.get(key), wanted.get(key)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            return f"field '{key}' differs: existing {json.dumps(a)} vs requested {json.dumps(b)}"
    return None


def storage_dtype(fields: dict) -> str:
    """The features' dtype in a store of these fingerprint fields (absent: float32)."""
    return fields.get("dtype", "float32")
