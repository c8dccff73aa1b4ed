"""Shared test fixtures: a small Gemma 2 and a small Gemma 3 with a tiny sliding window and weights that make a strong
reference, the same weights loaded into transformers' Gemma2ForCausalLM / Gemma3ForCausalLM (the reference
implementations), and the real Gemma 3 270M."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmatune.config import ModelConfig

# query_pre_attn_scalar differs from head_dim so a derived scale would show; the window of 8 makes every test
# sequence span several windows; the attention cap is lowered to where these small logits reach it.
SMALL = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                    attn_logit_softcap=3.0, max_position_embeddings=512)

# Gemma 3: eight layers, so the stack is one repeat of the 5 local : 1 global pattern and a partial repeat (two local
# layers); global RoPE scaled by 8 as on 4B and up, so a missing factor shows.
SMALL3 = ModelConfig(family="gemma3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                     num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcap=None,
                     final_logit_softcap=None, rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling=8.0,
                     max_position_embeddings=512)


def strong_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Norm weights far from zero (a missing 1 + w shows), large post-norms (diverse greedy text) and a large
    final norm so the logits reach the final soft-cap."""
    from gemmatune.model import init_params

    params = init_params(cfg, jax.random.key(seed), jnp.float32, norm_mean=0.5, post_norm_mean=5.0)
    return {**params, "final_norm": params["final_norm"] + 4.0}


def hf_classes(cfg: ModelConfig) -> tuple[type, type]:
    """transformers' (config class, causal LM class) of the config's family."""
    import transformers

    return {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
            "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[cfg.family]


def hf_model(cfg: ModelConfig, params: dict):
    """transformers' Gemma2ForCausalLM or Gemma3ForCausalLM (eager attention, float32) holding the same weights."""
    import torch

    from gemmatune.convert.hf import hf_state

    config_class, model_class = hf_classes(cfg)
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    model = model_class(config_class(**d, attn_implementation="eager")).eval()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in hf_state(cfg, params)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert list(missing) == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    return model


def hf_logits(model, tokens: np.ndarray, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in kw.items()}
        return model(torch.from_numpy(np.asarray(tokens)), **kw).logits.numpy()


@pytest.fixture(scope="session")
def small_cfg() -> ModelConfig:
    return SMALL


@pytest.fixture(scope="session")
def small_params() -> dict:
    return strong_params(SMALL)


@pytest.fixture(scope="session")
def small_hf(small_params):
    return hf_model(SMALL, small_params)


@pytest.fixture(scope="session")
def small3_params() -> dict:
    return strong_params(SMALL3)


@pytest.fixture(scope="session")
def small3_hf(small3_params):
    return hf_model(SMALL3, small3_params)


# --- the real Gemma 3 270M (GGUF), fetched once into a cache outside the repository -----------------------------

@pytest.fixture(scope="session")
def gemma3_gguf():
    """The path of Google's Gemma 3 270M as GGUF Q4_K_M (scripts/gemma3_270m.py downloads it on first use)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from gemma3_270m import gemma3_270m

    return gemma3_270m()


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_gguf):
    """transformers' Gemma3ForCausalLM on the same file (dequantized to float32, eager attention): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def gemma3_model(gemma3_gguf):
    """gemmatune's (config, float32 parameters) of the same file, loaded once per session."""
    from gemmatune.convert import load_model

    return load_model(gemma3_gguf, "float32")
