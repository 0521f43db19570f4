"""Multi-token prediction (SPEC.md §5): ``MultiTokenPrediction``, a head for ``model.heads``."""

from dsv3_lightning.plugins.mtp.head import MultiTokenPrediction
from dsv3_lightning.plugins.mtp.module import MTPModule
from dsv3_lightning.plugins.mtp.speculative import SpeculativeStats, speculative_generate

__all__ = ["MTPModule", "MultiTokenPrediction", "SpeculativeStats", "speculative_generate"]
