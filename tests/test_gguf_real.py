"""The real Gemma 3 270M (Google's GGUF, Q4_K_M) as --model: gemmatune's float32 logits equal transformers' on the
same file (transformers dequantizes it itself) on a few hundred tokens of English, greedy continuations agree for
plain and chat prompts, and the exports round-trip through the reference tools: HF (transformers reloads it with
the same logits) and GGUF (llama.cpp reloads it with the same greedy tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_gguf import _llama, _llama_greedy

from gemmatune.checkpoint import save_adapter
from gemmatune.config import LoraConfig
from gemmatune.generate import generate
from gemmatune.layout import adapter_shapes
from gemmatune.lora import attach, merge
from gemmatune.model import forward
from gemmatune.tokenizer import load_tokenizer

TEXT = (
    "The history of the lighthouse is, in many ways, the history of the sea itself. Long before engineers learned to "
    "build towers of stone and iron, sailors relied on fires lit on hilltops to warn them of dangerous rocks and to "
    "guide them home. The most famous of the ancient lights stood on the island of Pharos, near the harbour of "
    "Alexandria, and it was counted among the wonders of the world. Travellers wrote that its flame could be seen "
    "from many miles away, although historians still argue about how it worked. In the centuries that followed, "
    "coastal towns across Europe built their own towers, often paid for by tolls collected from passing ships. "
    "Keeping a light was lonely and demanding work. Keepers trimmed wicks, polished lenses and climbed hundreds of "
    "steps every night, whatever the weather. When the French physicist Augustin Fresnel designed a lens made of "
    "concentric rings of glass in 1822, a single lamp could suddenly be seen twice as far as before. Today most "
    "lighthouses are automated, and satellite navigation has replaced many of them, yet people still visit them on "
    "summer afternoons, drawn by the quiet romance of a light that kept watch while others slept."
)
PROMPTS = ["Water boils at a temperature of", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
CHATS = [[{"role": "user", "content": "What is the largest planet in the solar system?"}],
         [{"role": "system", "content": "Answer in one short sentence."},
          {"role": "user", "content": "Why is the sky blue?"}]]
NEW_TOKENS = 12
RTOL = 1e-4  # max |logit diff| / max |logit|


@pytest.fixture(scope="module")
def tokenizer(gemma3_gguf):
    return load_tokenizer(gemma3_gguf)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_logits_equal_transformers_on_real_text(gemma3_model, gemma3_hf, tokenizer):
    cfg, params = gemma3_model
    ids = tokenizer.encode(TEXT, add_bos=True)
    assert 200 < len(ids) < 400
    ours = np.asarray(forward(params, jnp.asarray([ids]), cfg))[0]
    theirs = _hf_logits(gemma3_hf, ids)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{len(ids)} tokens: max |diff| / max |logit| = {rel:.1e}")
    assert rel < RTOL
    # A model that knows English: most next tokens of real text are among its top 10.
    top10 = np.argsort(ours[:-1], axis=-1)[:, -10:]
    assert np.mean([t in row for t, row in zip(ids[1:], top10, strict=True)]) > 0.5


def test_greedy_continuations_equal_transformers(gemma3_model, gemma3_hf, tokenizer):
    cfg, params = gemma3_model
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    prompts += [tokenizer.encode_chat(m, add_generation_prompt=True) for m in CHATS]
    assert prompts[-1][:4] == [tokenizer.bos_id, tokenizer.start_of_turn_id, *tokenizer.encode("user\n")]
    ours = generate(params, cfg, prompts, max_new_tokens=NEW_TOKENS)  # one batch: rows of different lengths
    for ids, mine in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = gemma3_hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        print(repr(tokenizer.decode(ids)), "->", repr(tokenizer.decode(mine)))
        assert mine == out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, gemma3_model, gemma3_gguf):
    """A small random LoRA adapter on the real model (B nonzero, so the merge changes the weights), saved as
    gemmatune writes it; returns (directory, adapters, lora config)."""
    cfg, _ = gemma3_model
    lora_cfg = LoraConfig(rank=4, alpha=8, targets=("q", "v"))
    keys = iter(jax.random.split(jax.random.key(0), 8))
    adapters = {name: {part: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
                       for part, shape in s.items()} for name, s in adapter_shapes(cfg, lora_cfg).items()}
    out = tmp_path_factory.mktemp("real") / "adapter"
    save_adapter(out, adapters, lora_cfg, cfg, base_model=str(gemma3_gguf))
    return out, adapters, lora_cfg


def test_hf_export_reloads_in_transformers(tmp_path, gemma3_model, gemma3_gguf, adapter, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemmatune.export import export

    cfg, params = gemma3_model
    adapter_dir, adapters, lora_cfg = adapter
    out = export(gemma3_gguf, adapter_dir, "hf", tmp_path / "hf", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = tokenizer.encode(TEXT, add_bos=True)[:128]
    ours = np.asarray(forward(attach(params, adapters), jnp.asarray([ids]), cfg, adapter=lora_cfg))[0]
    theirs = _hf_logits(model, ids)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"HF export: max |diff| / max |logit| = {rel:.1e}")
    assert rel < RTOL
    # The tokenizer rebuilt from the GGUF vocabulary encodes as gemmatune's and carries the Gemma 3 template.
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == cfg.vocab_size
    assert hf_tok(TEXT).input_ids == tokenizer.encode(TEXT, add_bos=True)
    chat = hf_tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode(chat) == tokenizer.encode_chat(CHATS[1], add_generation_prompt=True)


def test_gguf_export_reloads_in_llama_cpp(tmp_path, gemma3_model, gemma3_gguf, adapter, tokenizer):
    import gguf as gguf_py

    from gemmatune.export import export

    cfg, params = gemma3_model
    adapter_dir, adapters, lora_cfg = adapter
    out = export(gemma3_gguf, adapter_dir, "gguf", tmp_path / "tuned.gguf", dtype="f32")
    fields = gguf_py.GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "gemma3"
    merged = merge(params, adapters, lora_cfg)
    llm = _llama(out)
    prompts = [tokenizer.encode(text, add_bos=True) for text in PROMPTS]
    for text, ids, ours in zip(PROMPTS, prompts, generate(merged, cfg, prompts, max_new_tokens=NEW_TOKENS),
                               strict=True):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids  # the copied vocabulary
        print(repr(text), "->", repr(tokenizer.decode(ours)))
        assert _llama_greedy(llm, ids, NEW_TOKENS) == ours
