"""The course tooling around the chapters: executing and scheduling them (:mod:`.chapters`, :mod:`.schedule`),
publishing (:mod:`.publish`), the student notebooks (:mod:`.exercises`) and their checkers (:mod:`.grading`,
one module per chapter: ``tdpo_lab.course.grading.ch04``), Colab (:mod:`.colab`) and offline stand-ins
(:mod:`.standins`)."""

from tdpo_lab.course.colab import drive_cache, resolve_profile
from tdpo_lab.course.standins import build_gpt2_stand_ins, uses_stand_ins

__all__ = ["build_gpt2_stand_ins", "drive_cache", "resolve_profile", "uses_stand_ins"]
