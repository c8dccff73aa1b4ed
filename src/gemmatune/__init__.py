"""gemmatune: LoRA fine-tuning of Gemma 2 in JAX."""

from gemmatune.config import PRESETS, ModelConfig, load_config
from gemmatune.errors import GemmatuneError

__version__ = "0.1.0"
__all__ = ["PRESETS", "GemmatuneError", "ModelConfig", "load_config", "__version__"]
