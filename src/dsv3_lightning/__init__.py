"""dsv3_lightning: train DeepSeek-V3-style models with PyTorch Lightning, one plugin per innovation."""

from dsv3_lightning.config import ModelConfig, YarnRopeScaling
from dsv3_lightning.model import CausalLMOutput, DeepSeekV3
from dsv3_lightning.presets import preset

__all__ = ["CausalLMOutput", "DeepSeekV3", "ModelConfig", "YarnRopeScaling", "preset"]
