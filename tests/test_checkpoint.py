"""Checkpoint files: our safetensors reader/writer against the safetensors library, Hugging Face checkpoint
directories against transformers (same logits, tied head, no lm_head written), bounded host memory while loading
and saving, and the message of every user-facing failure."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SMALL, hf_logits, strong_params
from gemmatune.config import ModelConfig
from gemmatune.convert import hf
from gemmatune.convert.hf import load_hf, save_hf
from gemmatune.errors import GemmatuneError
from gemmatune.model import forward
from gemmatune.safetensors_io import DTYPES, SafetensorsReader, write_safetensors

CORRUPT = "the file is truncated or corrupt; re-download or re-export it"
TOKENS = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 40))  # [B, T]: five sliding windows long


@pytest.fixture(scope="module")
def params() -> dict:
    return strong_params(SMALL)


@pytest.fixture
def ckpt(tmp_path: Path, params: dict) -> Path:
    """A fresh float32 single-file checkpoint of the SMALL model."""
    save_hf(tmp_path / "ckpt", SMALL, params, dtype="float32")
    return tmp_path / "ckpt"


def _hf_model(path: Path):
    import torch
    import transformers

    return transformers.Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                          dtype=torch.float32).eval()


def _stored_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for f in path.glob("*.safetensors"):
        with SafetensorsReader(f) as r:
            keys |= set(r.tensors)
    return keys


def _rewrite(path: Path, edit: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
    """Replace a (small) safetensors file by one holding edit(its tensors)."""
    with SafetensorsReader(path) as r:
        tensors = edit({k: r.read(k) for k in r.tensors})
    write_safetensors(path, [(k, a.shape, a.dtype) for k, a in tensors.items()], tensors.items(), {"format": "pt"})


def _edit_config(path: Path, **changes: object) -> None:
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, **changes}))


def _load_error(path: Path) -> str:
    with pytest.raises(GemmatuneError) as e:
        load_hf(path)
    return str(e.value)


# --- the safetensors format ------------------------------------------------------------------------------------

def _tensor(dtype: str) -> st.SearchStrategy[np.ndarray]:
    """Arbitrary bit patterns (NaNs, infinities, subnormals included) of a small random shape."""
    def from_shape(shape: list[int]) -> st.SearchStrategy[np.ndarray]:
        n = int(np.prod(shape)) * DTYPES[dtype].itemsize
        return st.binary(min_size=n, max_size=n).map(lambda b: np.frombuffer(b, DTYPES[dtype]).reshape(shape))
    return st.lists(st.integers(0, 4), max_size=3).flatmap(from_shape)


TENSOR_DICTS = st.dictionaries(st.text("abcxyz.0123", min_size=1, max_size=8),
                               st.sampled_from(["F32", "BF16", "F16", "I32", "I64", "U8"]).flatmap(_tensor),
                               min_size=1, max_size=5)
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(tensors=TENSOR_DICTS)
def test_reader_reads_library_files_bit_exactly(tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    path = tmp_path / "lib.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    with SafetensorsReader(path) as r:
        assert r.metadata == {"format": "pt"} and set(r.tensors) == set(tensors)
        for k, a in tensors.items():
            b = r.read(k)
            assert (b.dtype, b.shape, b.tobytes()) == (a.dtype, a.shape, a.tobytes())
            if a.ndim:
                assert r.read_rows(k, 1, 3).tobytes() == a[1:3].tobytes()


@FUZZ
@given(tensors=TENSOR_DICTS)
def test_library_reads_our_files_bit_exactly(tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, [(k, a.shape, a.dtype) for k, a in tensors.items()], tensors.items(), {"format": "pt"})
    names = {v: k for k, v in DTYPES.items()}
    stored = {k: (d["dtype"], tuple(d["shape"]), bytes(d["data"]))
              for k, d in safetensors.deserialize(path.read_bytes())}
    assert stored == {k: (names[a.dtype], a.shape, a.tobytes()) for k, a in tensors.items()}
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}


def _raw(header: object, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("content", [
    pytest.param(b"\x01\x02", id="shorter-than-8-bytes"),
    pytest.param((10**6).to_bytes(8, "little") + b"{}", id="header-beyond-file"),
    pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(range(64)), id="garbage"),
    pytest.param(_raw(b"{not json"), id="not-json"),
    pytest.param(_raw([1, 2]), id="not-an-object"),
    pytest.param(_raw({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), id="unknown-dtype"),
    pytest.param(_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), id="size-mismatch"),
    pytest.param(_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), id="overlap"),
    pytest.param(_raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(10)), id="truncated"),
])
def test_reader_refuses_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(GemmatuneError) as e:
        SafetensorsReader(path)
    assert str(path) in str(e.value) and CORRUPT in str(e.value)


# --- Hugging Face directories against transformers -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000], ids=["single", "sharded"])
def test_save_hf_loads_in_transformers(tmp_path: Path, params: dict, dtype: str, max_shard_bytes: int) -> None:
    out = tmp_path / "out"
    save_hf(out, SMALL, params, dtype=dtype, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    expected_keys = {key for key, _, _ in hf.hf_keys(SMALL)}
    if max_shard_bytes == 40_000:
        index = json.loads((out / hf.INDEX).read_text())
        assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
        assert set(index["weight_map"]) == expected_keys
        assert index["metadata"]["total_size"] == sum(os.path.getsize(out / f) for f in files) - sum(
            8 + int.from_bytes((out / f).read_bytes()[:8], "little") for f in files)
    else:
        assert files == ["model.safetensors"] and not (out / hf.INDEX).exists()
    assert _stored_keys(out) == expected_keys  # every tensor, and no lm_head: the head stays tied
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == SMALL.eos_token_id
    model = _hf_model(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stored = jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32), params)  # what the file holds
    np.testing.assert_allclose(hf_logits(model, TOKENS), forward(stored, jnp.asarray(TOKENS), SMALL), atol=1e-4,
                               rtol=0)
    # And back: the loaded parameters are the saved ones, bit for bit.
    cfg, loaded = load_hf(out)
    assert cfg == SMALL
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(dtype))), loaded,
                 params)


@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16"])
def test_load_hf_reads_transformers_checkpoints(tmp_path: Path, torch_dtype: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    d = {k: v for k, v in SMALL.to_hf_dict().items() if k not in ("architectures", "model_type")}
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**d))
    with torch.no_grad():  # transformers initialises norms at 0; move them off so a misread norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(3.0 if "post_" in name else 0.5, 0.1)
    model.to(getattr(torch, torch_dtype)).save_pretrained(tmp_path, safe_serialization=True)
    assert "lm_head.weight" not in _stored_keys(tmp_path)
    cfg, params = load_hf(tmp_path)
    assert cfg == SMALL and params["embed"].dtype == torch_dtype  # "auto" keeps the checkpoint's dtype
    ours = forward(jax.tree.map(lambda a: a.astype(jnp.float32), params), jnp.asarray(TOKENS), cfg)
    np.testing.assert_allclose(hf_logits(_hf_model(tmp_path), TOKENS), ours, atol=1e-4, rtol=0)


def test_load_hf_dtype_argument(ckpt: Path) -> None:
    _, p = load_hf(ckpt, dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(GemmatuneError, match="float16"):
        load_hf(ckpt, dtype="float16")


def test_tied_lm_head_is_accepted_untied_is_refused(ckpt: Path) -> None:
    embed = "model.embed_tokens.weight"
    _rewrite(ckpt / hf.WEIGHTS, lambda t: {**t, "lm_head.weight": t[embed].copy()})
    load_hf(ckpt)
    _rewrite(ckpt / hf.WEIGHTS, lambda t: {**t, "lm_head.weight": t[embed] + 1})
    msg = _load_error(ckpt)
    assert str(ckpt / hf.WEIGHTS) in msg and "untied heads are not supported" in msg


def test_save_hf_copies_tokenizer_and_stops_at_end_of_turn(tmp_path: Path, params: dict) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 107, "content": "<end_of_turn>"}]}))
    (tok / "special_tokens_map.json").write_text("{}")
    save_hf(tmp_path / "out", SMALL, params, tokenizer_dir=tok)
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    assert (tmp_path / "out/special_tokens_map.json").exists() and not (tmp_path / "out/tokenizer.model").exists()
    gen = json.loads((tmp_path / "out/generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 107]}
    with pytest.raises(GemmatuneError, match="tokenizer files"):
        save_hf(tmp_path / "out2", SMALL, params, tokenizer_dir=tmp_path / "out2")


# --- streaming memory ------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    jax.jit(lambda x: x + 1)(jnp.zeros(1)).block_until_ready()  # the baseline includes a working CPU backend
    from gemmatune.convert.hf import load_hf, save_hf

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # KiB

    def growth(fn, *args):
        # Peak RSS growth of fn, in KiB. VmHWM rather than getrusage's ru_maxrss: the latter survives exec, so a
        # child spawned by a large pytest process starts with the parent's peak. clear_refs 5 resets VmHWM.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        out = jax.block_until_ready(fn(*args))
        return out, status("VmHWM") - before

    (cfg, params), load = growth(load_hf, sys.argv[1])
    assert float(params["layers"]["down_proj"][-1, 0, 0]) == float(sys.argv[3])  # the last layer landed
    _, save = growth(save_hf, sys.argv[2], cfg, params)
    print(json.dumps({"load": load, "save": save}))
""")


def write_constant_checkpoint(src: Path, cfg: ModelConfig) -> int:
    """A float32 checkpoint whose j-th tensor (in hf_keys order) is filled with j, written one tensor at a time,
    so this process never holds the model either. Returns the weights' file size."""
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    layout = [(key, hf.hf_shape(name, cfg), np.float32) for key, name, _ in hf.hf_keys(cfg)]
    write_safetensors(src / hf.WEIGHTS, layout,
                      ((key, np.full(shape, j, np.float32)) for j, (key, shape, _) in enumerate(layout)),
                      {"format": "pt"})
    return os.path.getsize(src / hf.WEIGHTS)


@pytest.mark.slow
def test_load_and_save_stream_with_bounded_memory(tmp_path: Path) -> None:
    # ~300 MB of float32 whose largest tensor, the embedding, is ~6% of it; layer stacks are ~7% each.
    cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_layers=30, num_heads=8,
                      num_kv_heads=4, head_dim=64, query_pre_attn_scalar=64)
    src = tmp_path / "src"
    size = write_constant_checkpoint(src, cfg)
    keys = [key for key, _, _ in hf.hf_keys(cfg)]
    last = keys.index(f"model.layers.{cfg.num_layers - 1}.mlp.down_proj.weight")
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / "out"), str(last)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    kib = json.loads(run.stdout.strip().splitlines()[-1])
    load, save = kib["load"] * 1024 / size, kib["save"] * 1024 / size
    print(f"checkpoint {size / 1e6:.1f} MB: load_hf grew RSS by {kib['load'] * 1024 / 1e6:.1f} MB ({load:.2f}x), "
          f"save_hf by {kib['save'] * 1024 / 1e6:.1f} MB ({save:.2f}x)")
    assert size >= 200e6
    assert load <= 1.3, f"load_hf peak RSS growth {load:.2f}x the checkpoint size"
    assert save <= 0.3, f"save_hf peak RSS growth {save:.2f}x the checkpoint size: it must not copy the model"
    assert filecmp.cmp(src / hf.WEIGHTS, tmp_path / "out" / hf.WEIGHTS, shallow=False)  # loaded and saved intact


# --- errors ----------------------------------------------------------------------------------------------------

def test_missing_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    msg = _load_error(ckpt)
    assert str(ckpt / "config.json") in msg and "no such file" in msg


@pytest.mark.parametrize("model_type, what", [("gemma", "Gemma 1"), ("gemma3n_text", "Gemma 3n"), ("llama", "Llama")])
def test_other_architectures_are_refused(ckpt: Path, model_type: str, what: str) -> None:
    _edit_config(ckpt, model_type=model_type)
    msg = _load_error(ckpt)
    assert str(ckpt / "config.json") in msg and f"this is a {what} checkpoint, not Gemma 2" in msg


def test_missing_weights(ckpt: Path) -> None:
    (ckpt / hf.WEIGHTS).unlink()
    msg = _load_error(ckpt)
    assert str(ckpt) in msg and "no model.safetensors" in msg and "re-download" in msg


def test_shards_without_index(tmp_path: Path, params: dict) -> None:
    save_hf(tmp_path / "ck", SMALL, params, max_shard_bytes=40_000)
    (tmp_path / "ck" / hf.INDEX).unlink()
    msg = _load_error(tmp_path / "ck")
    assert "model-00001-of-" in msg and f"no {hf.INDEX}" in msg and "download the index" in msg


def test_shard_listed_in_index_missing(tmp_path: Path, params: dict) -> None:
    save_hf(tmp_path / "ck", SMALL, params, max_shard_bytes=40_000)
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _load_error(tmp_path / "ck")
    assert str(shard) in msg and str(tmp_path / "ck" / hf.INDEX) in msg and "missing" in msg


def test_config_and_weights_disagree_on_a_shape(ckpt: Path) -> None:
    _edit_config(ckpt, intermediate_size=96)
    msg = _load_error(ckpt)
    assert ("model.layers.0.mlp.gate_proj.weight" in msg and str(ckpt / hf.WEIGHTS) in msg and "[128, 64]" in msg
            and "[96, 64]" in msg and "the config.json and the weights disagree" in msg)


def test_truncated_weights(ckpt: Path) -> None:
    path = ckpt / hf.WEIGHTS
    os.truncate(path, os.path.getsize(path) - 1000)
    msg = _load_error(ckpt)
    assert str(path) in msg and CORRUPT in msg


def test_corrupt_header(ckpt: Path) -> None:
    path = ckpt / hf.WEIGHTS
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage \x00")
    msg = _load_error(ckpt)
    assert str(path) in msg and CORRUPT in msg


def test_missing_tensor(ckpt: Path) -> None:
    key = "model.layers.3.mlp.down_proj.weight"
    _rewrite(ckpt / hf.WEIGHTS, lambda t: {k: v for k, v in t.items() if k != key})
    msg = _load_error(ckpt)
    assert key in msg and str(ckpt / hf.WEIGHTS) in msg and "missing" in msg


def test_unknown_tensor(ckpt: Path) -> None:
    key = "model.layers.0.self_attn.q_proj.bias"
    _rewrite(ckpt / hf.WEIGHTS, lambda t: {**t, key: np.zeros(64, np.float32)})
    msg = _load_error(ckpt)
    assert key in msg and str(ckpt / hf.WEIGHTS) in msg and "unknown tensor" in msg


def test_non_empty_output_directory_needs_force(ckpt: Path, params: dict) -> None:
    (ckpt / "stray.txt").write_text("x")
    with pytest.raises(GemmatuneError) as e:
        save_hf(ckpt, SMALL, params)
    assert str(ckpt) in str(e.value) and "force" in str(e.value) and "another output directory" in str(e.value)
    save_hf(ckpt, SMALL, params, dtype="bfloat16", force=True)
    assert not (ckpt / "stray.txt").exists() and load_hf(ckpt)[1]["embed"].dtype == jnp.bfloat16


def _failing_hf_state(after: int) -> Callable:
    real = hf.hf_state

    def hf_state(*args: object, **kw: object):
        for n, item in enumerate(real(*args, **kw)):
            if n == after:
                raise RuntimeError("interrupted")
            yield item
    return hf_state


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000], ids=["single", "sharded"])
def test_interrupted_save_leaves_nothing_behind(tmp_path: Path, params: dict, monkeypatch: pytest.MonkeyPatch,
                                                max_shard_bytes: int) -> None:
    old = tmp_path / "old"
    save_hf(old, SMALL, params)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(hf, "hf_state", _failing_hf_state(after=20))
    for out, force in ((tmp_path / "new", False), (old, True)):
        with pytest.raises(RuntimeError, match="interrupted"):
            save_hf(out, SMALL, params, dtype="bfloat16", max_shard_bytes=max_shard_bytes, force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no output, no temporary directory left
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
