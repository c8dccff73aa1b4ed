"""Meshes: the same numbers on any mesh as on one device, loading onto shards, and how little is replicated.

The tests that need several devices run on 8 simulated CPU devices in one child pytest process
(`test_on_8_simulated_devices` starts it with XLA_FLAGS=--xla_force_host_platform_device_count=8), so the rest of
the suite keeps its single device and its speed. The rules themselves are checked here on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_train_step import rows

from conftest import SMALL, strong_params
from gemmatune import flash
from gemmatune import model as M
from gemmatune import sharding as S
from gemmatune import step as T
from gemmatune.config import PRESETS, LoraConfig, ModelConfig, Quantization, TrainConfig
from gemmatune.errors import GemmatuneError
from gemmatune.layout import adapter_shapes, is_shape, nbytes, param_axes, param_shapes, param_structs, trainable_axes
from gemmatune.quantize import quantize

EIGHT = jax.device_count() >= 8
on_eight = pytest.mark.skipif(not EIGHT, reason="runs in test_on_8_simulated_devices' child process")
# Heads, key/value heads, MLP units and vocabulary all divide by 8, so every rule applies on every mesh.
DIV8 = dataclasses.replace(SMALL, num_heads=8, num_kv_heads=8, num_layers=2, layer_types=())
ODD = dataclasses.replace(SMALL, num_layers=2, layer_types=())  # 4 heads and 2 key/value heads: not on model=8
# adam_eps well above the gradients' rounding noise: Adam's first update is otherwise lr * sign(g), which a 1e-7
# difference in a near-zero gradient flips.
TCFG = TrainConfig(dtype="float32", lora=LoraConfig(rank=4, alpha=8.0), lr=1e-2, remat="none", loss_chunk=64,
                   clip_norm=0.0, batch_size=8, grad_accum=2, adam_eps=1e-3)
# A child process's environment: 8 simulated CPU devices, this checkout's gemmatune.
EIGHT_ENV = {**os.environ,
             "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
             "PYTHONPATH": os.pathsep.join([str(Path(S.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
MESHES = ["data=8", "model=8", "data=2,model=4"]  # fsdp: in test_generation_is_the_same_on_a_mesh


# --- the rules, on one device ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_every_parameter_and_adapter_has_logical_axes(name: str) -> None:
    cfg, lcfg = PRESETS[name], LoraConfig()
    for axes, shapes in [(param_axes(cfg), param_shapes(cfg)),
                         (trainable_axes(cfg, "lora", lcfg), adapter_shapes(cfg, lcfg))]:
        assert jax.tree.structure(axes, is_leaf=is_shape) == jax.tree.structure(shapes, is_leaf=is_shape)
        assert all(isinstance(a, str) for a in jax.tree.leaves(axes))  # axes are names, shapes are integers
        ranks = jax.tree.map(lambda a, s: len(a) == len(s), axes, shapes, is_leaf=is_shape)
        assert all(jax.tree.leaves(ranks)), ranks


def test_spec_splits_by_the_rules_and_replicates_what_does_not_divide() -> None:
    mesh = {"data": 2, "fsdp": 2, "model": 4}
    assert S.spec(("layers", "embed", "heads", "head_dim"), (4, 64, 8, 16), mesh) == P(None, ("fsdp",), ("model",),
                                                                                        None)
    # gemma2-2b's 4 key/value heads on model=8: replicated over model, never an error.
    assert S.spec(("layers", "embed", "kv_heads", "head_dim"), (26, 2304, 4, 256), {"model": 8}) == P(None, None,
                                                                                                     None, None)
    # Rows over data and fsdp; 6 rows on data=2 x fsdp=4 keep data only (the axes are dropped from the end).
    assert S.spec(S.BATCH, (8, 32), mesh) == P(("data", "fsdp"), None)
    assert S.spec(S.BATCH, (6, 32), {"data": 2, "fsdp": 4}) == P(("data",), None)
    # A mesh axis is used once per array: the embedding's rows take model and fsdp, its columns nothing.
    assert S.spec(("vocab", "embed"), (256, 64), mesh) == P(("model", "fsdp"), None)
    assert S.spec(("vocab", "embed"), (256, 64), {"data": 8}) == P(None, None)  # size-1 axes are left out


def test_mesh_specs_and_their_errors() -> None:
    assert S.parse_mesh("data=2,model=4", 8) == {"data": 2, "fsdp": 1, "model": 4}
    assert S.parse_mesh({"fsdp": -1, "model": 2}, 8) == {"data": 1, "fsdp": 4, "model": 2}
    for bad, match in [("data=2,model=2", "= 4 devices for 8"), ("dat=8", "unknown mesh axis 'dat'"),
                       ("data=x", "not an integer"), ("data=2,data=4", "given twice"), ("data=0,model=8", "positive"),
                       ("data=-1,model=-1", "only one axis")]:
        with pytest.raises(GemmatuneError, match=match):
            S.parse_mesh(bad, 8)
    mesh = S.make_mesh("", jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}  # one device: nothing split, nothing slower
    # A TPU v3-8 (one host, 8 cores): gemma2-9b/27b split eight ways; 2b's 4 key/value heads take model=4.
    assert S.default_mesh_shape(8, 8, PRESETS["gemma2-9b"]) == {"data": 1, "fsdp": 1, "model": 8}
    assert S.default_mesh_shape(8, 8, PRESETS["gemma2-2b"]) == {"data": 2, "fsdp": 1, "model": 4}
    assert S.default_mesh_shape(16, 4) == {"data": 4, "fsdp": 1, "model": 4}  # 4 hosts of 4: data across hosts
    # The data groups divide the batch; the model axis takes the devices they leave (a v5e-8, gemma2-2b).
    two_b = PRESETS["gemma2-2b"]
    assert S.default_mesh_shape(8, 8, two_b, batch_size=1) == {"data": 1, "fsdp": 1, "model": 8}
    assert S.default_mesh_shape(8, 8, two_b, batch_size=6) == {"data": 2, "fsdp": 1, "model": 4}
    assert S.default_mesh_shape(16, 4, batch_size=6) == {"data": 2, "fsdp": 1, "model": 8}
    for n, per_host, batch in [(8, 8, 1), (8, 8, 3), (16, 4, 2), (32, 8, 12), (1, 1, 5)]:
        shape = S.default_mesh_shape(n, per_host, two_b, batch_size=batch)
        assert shape["data"] * shape["model"] == n and batch % shape["data"] == 0, (n, per_host, batch, shape)
    with pytest.raises(GemmatuneError, match="batch_size: 3 rows"):
        S.check_batch(jax.sharding.AbstractMesh((2, 1, 1), S.AXES), 3)


def test_shard_is_a_no_op_off_mesh() -> None:
    x = jnp.ones((2, 3))
    assert S.shard(x, "batch", "seq") is x
    with S.active(S.make_mesh("", jax.devices()[:1])):  # a one-device mesh constrains nothing either
        assert S.shard(x, "batch", "seq") is x


# --- on 8 simulated devices ------------------------------------------------------------------------------------

@pytest.mark.skipif(EIGHT, reason="already on 8 devices")
@pytest.mark.slow
def test_on_8_simulated_devices() -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=EIGHT_ENV, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent,
                       check=False)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]


def _train_step(cfg: ModelConfig, mesh: jax.sharding.Mesh | None, tcfg: TrainConfig = TCFG,
                teacher: ModelConfig | None = None) -> tuple[dict, dict]:
    """One step (2 micro-batches of 8 rows) from adapters with a non-zero B, so both A and B get gradients; with
    tcfg.quantize, on the base quantized as the loaders quantize it; with `teacher`, distilling from a teacher of
    that config in the step."""
    base = strong_params(cfg)
    if tcfg.quantization() is not None:
        base = {**base, "layers": {k: quantize(v, k, tcfg.quantization()) if k.endswith("_proj") else v
                                   for k, v in base["layers"].items()}}
    opt = T.optimizer(tcfg, 10)
    trainable, frozen = T.split_trainable(base, cfg, tcfg, jax.random.key(1))
    trainable = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), trainable)
    if teacher is not None:
        frozen = {**frozen, "teacher": strong_params(teacher, seed=1)}
    b, shape = rows(16), (2, 8, 32)
    if mesh is None:
        state, batches = T.init_state(trainable, opt, jax.random.key(3)), T.Shapes(*shape).stack(b)
    else:
        sh = T.step_shardings(cfg, tcfg, mesh, opt, teacher)
        state, frozen = T.init_state(trainable, opt, jax.random.key(3), sh.state), S.put(frozen, sh.frozen)
        batches = T.global_batch(b, sh.batches, shape)
    new, metrics = T.make_train_step(cfg, tcfg, opt, mesh, teacher=teacher)(state, frozen, batches)
    if mesh is not None:  # the state stays where step_shardings put it
        flat = zip(jax.tree.leaves(new["params"]), jax.tree.leaves(sh.state["params"]))
        assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in flat)
    return jax.device_get(new["params"]), jax.device_get(metrics)


@on_eight
@pytest.mark.parametrize("cfg", [DIV8, ODD], ids=["divisible", "not-divisible"])
def test_one_train_step_is_the_same_on_every_mesh(cfg: ModelConfig) -> None:
    ref_params, ref = _train_step(cfg, None)
    for spec in MESHES if cfg is DIV8 else ["model=8"]:
        params, m = _train_step(cfg, S.make_mesh(spec))
        np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-6, atol=1e-5, err_msg=spec)
        np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-5, err_msg=spec)
        assert m["seen"] == ref["seen"] and m["tokens"] == ref["tokens"]
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{spec} {jax.tree_util.keystr(path)}")


@on_eight
def test_the_flash_kernel_gives_the_same_numbers_on_a_mesh(monkeypatch) -> None:
    """The Pallas attention kernel (interpret mode, tiles of 16 for this head_dim-16 config) runs per shard on a
    mesh, rows over data and heads over model: outputs and the gradients of q, k and v equal the XLA path's on one
    device (local layer, window 8 < 32; two packed segments and padding in one row)."""
    monkeypatch.setitem(flash.BLOCKS, 16, flash.Blocks(q=16, k=16, bwd_q=16, bwd_k=16, warps=4, stages=2))
    B, T, H, K, E = 4, 32, DIV8.num_heads, DIV8.num_kv_heads, DIV8.head_dim
    r = np.random.RandomState(0)
    q, k, v, cot = (jnp.asarray(r.randn(B, T, n, E), jnp.float32) for n in (H, K, K, H))
    seg = np.ones((B, T), np.int32)
    seg[1, 12:], seg[1, 28:] = 2, 0
    seg = jnp.asarray(seg)
    cot = cot * (seg != 0)[:, :, None, None]  # nothing reads padding rows
    mesh = S.make_mesh("data=2,model=4")

    def loss(impl, q, k, v):
        with S.active(mesh if impl == "flash" else None):
            out, _ = M.full_attend(DIV8, seg, impl)["sliding_attention"](q, k, v)
        return jnp.sum(out * cot)

    ref, got = (jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(q, k, v)
                for impl in ("xla", "flash"))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), rtol=0)


@on_eight
def test_a_quantized_base_trains_the_same_on_a_mesh() -> None:
    """QLoRA: codes and scales split like the weights they replace; one step gives the same numbers as on one
    device."""
    tcfg = dataclasses.replace(TCFG, quantize="nf4", quantize_block=32, double_quant=True)
    ref_params, ref = _train_step(DIV8, None, tcfg)
    params, m = _train_step(DIV8, S.make_mesh("data=2,fsdp=2,model=2"), tcfg)
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-6, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@on_eight
def test_distillation_trains_the_same_on_a_mesh() -> None:
    """A teacher in the step (here with a larger vocabulary) is split like any base; one step gives the same numbers
    as on one device, the divergence and cross-entropy included."""
    tcfg = dataclasses.replace(TCFG, method="distill", teacher="big", kd_temperature=2.0)
    teacher = dataclasses.replace(DIV8, vocab_size=DIV8.vocab_size + 64)
    ref_params, ref = _train_step(DIV8, None, tcfg, teacher)
    params, m = _train_step(DIV8, S.make_mesh("data=2,fsdp=2,model=2"), tcfg, teacher)
    assert set(m) == set(ref) == {"loss", "tokens", "grad_norm", "finite", "seen", "kd", "ce"}
    for k in ref:
        np.testing.assert_allclose(m[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@on_eight
def test_generation_is_the_same_on_a_mesh() -> None:
    from gemmatune.generate import generate
    from gemmatune.model import forward, init_params, unstack

    params = unstack(strong_params(DIV8))
    prompts = [[2, 17, 33, 5, 9], [2, 80, 81]]
    ref = generate(params, DIV8, prompts, max_new_tokens=12)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, DIV8.vocab_size, (8, 24)))
    # Logits of unit scale (strong_params' reach 30, where float32 rounds at 2e-6 and sums differ by several ulps).
    weights = init_params(DIV8, jax.random.key(0), jnp.float32, norm_mean=0.5)
    ref_logits = forward(weights, tokens, DIV8)
    for spec in ["model=8", "data=2,fsdp=2,model=2"]:
        mesh = S.make_mesh(spec)
        placed = S.put(params, S.param_shardings(DIV8, mesh, stacked=False))
        assert generate(placed, DIV8, prompts, max_new_tokens=12) == ref
        stacked = S.put(weights, S.param_shardings(DIV8, mesh))
        with S.active(mesh):
            logits = jax.jit(lambda p, t: forward(p, t, DIV8))(stacked, tokens)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0, err_msg=spec)


@on_eight
@pytest.mark.parametrize("stacked", [True, False])
def test_load_hf_places_each_tensor_on_its_shards(tmp_path: Path, stacked: bool) -> None:
    from gemmatune.convert.hf import load_hf, save_hf

    save_hf(tmp_path / "ckpt", DIV8, strong_params(DIV8), dtype="float32")
    _, ref = load_hf(tmp_path / "ckpt", stacked=stacked)
    mesh = S.make_mesh("data=2,model=4")
    _, params = load_hf(tmp_path / "ckpt", stacked=stacked, mesh=mesh)
    want = S.param_shardings(DIV8, mesh, stacked=stacked)
    assert all(a.sharding.is_equivalent_to(s, a.ndim)
               for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))


@on_eight
@pytest.mark.parametrize("name", ["gemma2-9b", "gemma2-27b"])
@pytest.mark.parametrize("spec", ["model=8", "data=2,model=4", "fsdp=2,model=4"])
def test_little_of_the_base_is_replicated_on_a_model_parallel_mesh(name: str, spec: str) -> None:
    cfg, mesh = PRESETS[name], S.make_mesh(spec)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), param_shapes(cfg),
                          is_leaf=lambda s: isinstance(s, tuple))
    shardings = S.param_shardings(cfg, mesh)
    total = sum(a.size * 2 for a in jax.tree.leaves(shapes))
    per_device = sum(np.prod(s.shard_shape(a.shape)) * 2 for a, s in zip(jax.tree.leaves(shapes),
                                                                          jax.tree.leaves(shardings)))
    split = mesh.shape["fsdp"] * mesh.shape["model"]  # data parallelism replicates on purpose
    extra = per_device / (total / split) - 1  # the share of each device's bytes that an even split would not hold
    print(f"{name} on {spec}: {per_device / 2**30:.2f} GiB per device, {100 * extra:.3f}% above an even split")
    assert extra <= 0.01


@on_eight
def test_abstract_step_compiles_without_weights() -> None:
    mesh = S.make_mesh("model=2", jax.devices()[:2])
    tcfg = TrainConfig(batch_size=2)
    step, args = T.abstract_step(PRESETS["tiny"], tcfg, mesh, T.Shapes(1, 2, 64))
    assert all(isinstance(a, jax.ShapeDtypeStruct) and a.sharding.mesh == mesh for a in jax.tree.leaves(args))
    memory = step.lower(*args).compile().memory_analysis()
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0


# --- loading memory --------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    jax.jit(lambda x: x + 1)(jnp.zeros(1)).block_until_ready()  # the baseline includes a working CPU backend
    from gemmatune import sharding
    from gemmatune.convert.hf import load_hf

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # KiB

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak
    before = status("VmRSS")
    from gemmatune.config import Quantization
    quant = Quantization(sys.argv[3]) if len(sys.argv) > 3 else None
    cfg, params = load_hf(sys.argv[1], mesh=sharding.make_mesh(sys.argv[2]), quant=quant)
    jax.block_until_ready(params)
    print(json.dumps({"peak": status("VmHWM") - before, "after": status("VmRSS") - before}))
""")


@pytest.mark.skipif(EIGHT, reason="measured in a fresh process")
@pytest.mark.slow
def test_loading_onto_a_mesh_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    from test_checkpoint import write_constant_checkpoint

    cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_layers=30, num_heads=8,
                      num_kv_heads=4, head_dim=64, query_pre_attn_scalar=64)
    size = write_constant_checkpoint(tmp_path / "src", cfg)
    largest = cfg.vocab_size * cfg.hidden_size * 4
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "src"), "fsdp=2,model=4"], env=EIGHT_ENV,
                       check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kib = json.loads(r.stdout.strip().splitlines()[-1])
    # The simulated devices' memory is host memory, so the loaded model itself (split 8 ways: once in all) is in
    # RSS. Beyond it, loading may hold a tensor and a layer; reading the model to the host first would double it.
    beyond = kib["peak"] * 1024 - size
    print(f"checkpoint {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB: peak RSS growth "
          f"{kib['peak'] * 1024 / 1e6:.0f} MB, {beyond / 1e6:.0f} MB beyond the model "
          f"({beyond / largest:.1f} x the largest tensor)")
    assert size >= 200e6
    assert beyond <= 0.2 * size, "loading onto a mesh must hold a tensor or so on the host, not the model"

    # QLoRA: quantized as it streams, the float32 model never exists: NF4 keeps 4.5 of every 32 bits of the
    # projections (the embedding stays float32), so the peak is a fraction of the checkpoint.
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "src"), "fsdp=2,model=4", "nf4"], env=EIGHT_ENV,
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"] * 1024
    quantized = nbytes(param_structs(cfg, jnp.float32, Quantization("nf4")))
    print(f"quantized to NF4 while loading: peak RSS growth {peak / 1e6:.0f} MB, the quantized model "
          f"{quantized / 1e6:.0f} MB")
    assert peak <= quantized + 0.25 * size, "quantizing must happen tensor by tensor, not after loading the model"
