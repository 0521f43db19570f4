"""The DeepSeek-V3 transformer: rope.py, attention.py (MLA), router.py and moe.py (DeepSeekMoE),
transformer.py (blocks and the causal LM)."""

from dsv3_lightning.model.transformer import CausalLMOutput, DeepSeekV3

__all__ = ["CausalLMOutput", "DeepSeekV3"]
