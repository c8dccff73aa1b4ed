"""gemmatune: LoRA fine-tuning of Gemma 2 in JAX."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gemmatune.config import (
    PRESETS,
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from gemmatune.errors import GemmatuneError

if TYPE_CHECKING:
    from gemmatune.loop import Result

__version__ = "0.1.0"
__all__ = ["PRESETS", "DataConfig", "GemmatuneError", "LoraConfig", "ModelConfig", "TrainConfig", "load_config",
           "train", "__version__"]


def train(config: TrainConfig) -> Result:
    """Fine-tune as `gemmatune train` does: `gemmatune.train(TrainConfig(data=DataConfig(paths=("my.jsonl",))))`.
    Imported here, not at the top, so that `import gemmatune` stays light (no JAX)."""
    from gemmatune import loop

    return loop.train(config)
