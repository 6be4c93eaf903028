"""featcache: extract frozen-backbone features once, evaluate them many times."""

__version__ = "0.1.0"
