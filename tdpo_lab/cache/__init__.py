"""The cache: one way to store a keyed product (:mod:`.store`) and the graph of stages and keys (:mod:`.plan`)."""

from tdpo_lab.cache.plan import STAGES, Plan, register_stage
from tdpo_lab.cache.store import CacheError, CacheWarning, Entry, Stage, fetch

__all__ = ["STAGES", "CacheError", "CacheWarning", "Entry", "Plan", "Stage", "fetch", "register_stage"]
