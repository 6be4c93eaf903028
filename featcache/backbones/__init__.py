"""The backbone registry: named entries, and any timm or transformers model by prefix.

``load_backbone(name)`` returns the frozen model together with its preprocessing, like
``clip.load``; ``name`` is a named entry (``featcache backbones``), ``timm:NAME[.TAG]`` or
``hf:REPO``. Layout: ``registry`` (entries, families, kinds), ``loading`` (strict loading),
one module per model library (``hf_models``, ``timm_models``, ``simclr_encoder``) and
``entries`` (the named ones).
"""

from featcache.backbones import entries  # noqa: F401  (registers the families and entries)
from featcache.backbones.registry import (
    Backbone,
    BackboneSpec,
    available_backbones,
    builder,
    describe,
    family,
    get_spec,
    hub_revision,
    load_backbone,
    register,
    save_random_weights,
    weights_identity,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "available_backbones",
    "builder",
    "describe",
    "family",
    "get_spec",
    "hub_revision",
    "load_backbone",
    "register",
    "save_random_weights",
    "weights_identity",
]
