"""LoRA, the chunked loss and the train step: exact accumulation, adapters-only state, bounded loss memory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import SMALL
from gemmatune import lora
from gemmatune import model as M
from gemmatune.config import LoraConfig, ModelConfig, TrainConfig
from gemmatune.loss import chunked_loss
from gemmatune.step import (
    Shapes,
    init_state,
    make_eval_step,
    make_train_step,
    optimizer,
    split_trainable,
    supervised_loss,
)

TCFG = TrainConfig(dtype="float32", lora=LoraConfig(rank=4, alpha=8.0), lr=1e-2, remat="none", loss_chunk=24,
                   clip_norm=0.0)
rng = np.random.RandomState(0)


def rows(n: int, T: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """n packed rows with two segments of random lengths and random weights, as the data loader makes them."""
    r = np.random.RandomState(seed)
    out = {k: np.zeros((n, T), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["weights"] = np.zeros((n, T), np.float32)
    for i in range(n):
        a = r.randint(4, T - 4)
        b = r.randint(2, T - a + 1)
        out["inputs"][i, :a + b] = r.randint(3, SMALL.vocab_size, a + b)
        out["targets"][i, :a + b] = r.randint(3, SMALL.vocab_size, a + b)
        out["segment_ids"][i, :a + b] = [1] * a + [2] * b
        out["positions"][i, :a + b] = list(range(a)) + list(range(b))
        out["weights"][i, :a + b] = r.rand(a + b) < 0.6
    return out


def full_loss(params, batch, cfg, adapter=None):
    """Reference: the full [B, T, V] logits, log-softmax, weighted mean."""
    logits = M.forward(params, jnp.asarray(batch["inputs"]), cfg, positions=jnp.asarray(batch["positions"]),
                       segment_ids=jnp.asarray(batch["segment_ids"]), adapter=adapter)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_loss_equals_full_logits_loss(small_params, chunk):
    b = rows(3)
    h = M.hidden_states(small_params, jnp.asarray(b["inputs"]), SMALL, positions=jnp.asarray(b["positions"]),
                        segment_ids=jnp.asarray(b["segment_ids"]))
    s, c = chunked_loss(small_params, h, jnp.asarray(b["targets"]), jnp.asarray(b["weights"]), SMALL, chunk)
    rs, rc = full_loss(small_params, b, SMALL)
    assert float(c) == float(rc) == b["weights"].sum()
    np.testing.assert_allclose(float(s), float(rs), rtol=1e-5)


def test_chunked_loss_gradients_equal_full_logits_gradients(small_params):
    """The hand-written VJP (hidden-state gradient made in the forward pass, embedding gradient recomputed) gives
    autodiff's gradients of the full-logits loss for h, the embedding, the final norm and the weights."""
    b = rows(3)
    h = M.hidden_states(small_params, jnp.asarray(b["inputs"]), SMALL, positions=jnp.asarray(b["positions"]),
                        segment_ids=jnp.asarray(b["segment_ids"]))
    targets, w = jnp.asarray(b["targets"]), jnp.asarray(b["weights"]) * jnp.linspace(0.5, 1.5, 32)

    def ours(p, h, w):
        return chunked_loss(p, h, targets, w, SMALL, 7)[0]

    def ref(p, h, w):
        logp = jax.nn.log_softmax(M.logits_from_hidden(p, h, SMALL), -1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * w)

    top = {k: small_params[k] for k in ("embed", "final_norm")}
    got = jax.grad(ours, argnums=(0, 1, 2))(top, h, w)
    want = jax.grad(ref, argnums=(0, 1, 2))(top, h, w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(r))) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_loss_equals_transformers(small_params, small_hf):
    """Mean loss over trained targets of one unpacked sequence = transformers' loss with labels -100 elsewhere."""
    tokens = rng.randint(3, SMALL.vocab_size, 30)
    trained = rng.rand(29) < 0.5
    labels = np.where(np.concatenate([[False], trained]), tokens, -100)
    with torch.no_grad():
        ref = small_hf(torch.tensor(tokens[None]), labels=torch.tensor(labels[None])).loss.item()
    h = M.hidden_states(small_params, jnp.asarray(tokens[None, :-1]), SMALL)
    s, c = chunked_loss(small_params, h, jnp.asarray(tokens[None, 1:]), jnp.asarray(trained[None]), SMALL, 8)
    np.testing.assert_allclose(float(s / c), ref, rtol=1e-5)


def _step(tcfg: TrainConfig, params, batch_rows, k: int, B: int, steps: int = 1, loss_fn=None):
    opt = optimizer(tcfg, 10)
    trainable, frozen = split_trainable(params, SMALL, tcfg, jax.random.key(1))
    # Non-zero B, so the gradient of A is not trivially zero.
    trainable = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(2), a.shape), trainable)
    state = init_state(trainable, opt, jax.random.key(3))
    step = make_train_step(SMALL, tcfg, opt, loss_fn=loss_fn)
    shapes = Shapes(k, B, batch_rows["inputs"].shape[1])
    metrics = []
    for _ in range(steps):
        state, m = step(state, frozen, shapes.stack(batch_rows))
        metrics.append(m)
    return state, metrics


def test_grad_accumulation_equals_one_big_batch(small_params):
    """4 micro-batches of 2 rows (different trained-token counts each) = one batch of 8 rows, float32."""
    b = rows(8)
    s1, m1 = _step(dataclasses.replace(TCFG, grad_accum=4, batch_size=2), small_params, b, 4, 2)
    s8, m8 = _step(dataclasses.replace(TCFG, grad_accum=1, batch_size=8), small_params, b, 1, 8)
    np.testing.assert_allclose(float(m1[0]["loss"]), float(m8[0]["loss"]), rtol=1e-6)
    assert float(m1[0]["tokens"]) == b["weights"].sum()
    for x, y in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
    # and the loss is the reference's token-weighted mean, not a mean of per-micro-batch means
    ref_s, ref_c = full_loss(lora.attach(small_params, _step(TCFG, small_params, b, 1, 8, steps=0)[0]["params"]),
                             b, SMALL, TCFG.lora)
    np.testing.assert_allclose(float(m8[0]["loss"]), float(ref_s / ref_c), rtol=1e-5)


def test_the_step_minimises_the_loss_function_it_is_given(small_params):
    """The objective is a loss function of a batch: one that trains on every target of the rows gives the step
    (and the evaluation) of the default objective on the same rows with every weight 1."""
    b = rows(2)
    every = {**b, "weights": (b["segment_ids"] > 0).astype(np.float32)}
    supervised = supervised_loss(SMALL, TCFG)

    def every_target(trainable, frozen, batch, key):
        return supervised(trainable, frozen, {**batch, "weights": (batch["segment_ids"] > 0).astype(jnp.float32)},
                          key)

    got, [mg] = _step(TCFG, small_params, b, 1, 2, loss_fn=every_target)
    want, [mw] = _step(TCFG, small_params, every, 1, 2)
    assert float(mg["tokens"]) == float(mw["tokens"]) > b["weights"].sum()
    np.testing.assert_allclose(float(mg["loss"]), float(mw["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    s, c, _ = make_eval_step(SMALL, TCFG, loss_fn=every_target)(got["params"], small_params,
                                                             {k: jnp.asarray(v) for k, v in b.items()})
    rs, rc, _ = make_eval_step(SMALL, TCFG)(got["params"], small_params, {k: jnp.asarray(v) for k, v in every.items()})
    assert float(c) == float(rc)
    np.testing.assert_allclose(float(s), float(rs), rtol=1e-6)


def test_train_state_holds_adapters_only(small_params):
    state, _ = _step(TCFG, small_params, rows(2), 1, 2)
    base_shapes = {a.shape for a in jax.tree.leaves(small_params)}
    leaves = jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])
    big = [a.shape for a in leaves if a.ndim and a.shape in base_shapes]
    assert not big
    n_state = sum(a.size for a in leaves)
    assert n_state <= 3.1 * lora.count(state["params"])  # params + Adam's two moments (+ counters)
    assert lora.count(state["params"]) < 0.2 * lora.count(small_params)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state["params"]))


def test_training_lowers_the_loss_and_compiles_once(small_params):
    b = rows(4)
    tcfg = dataclasses.replace(TCFG, batch_size=4)
    _, metrics = _step(tcfg, small_params, b, 1, 4, steps=8)
    losses = [float(m["loss"]) for m in metrics]
    assert losses[-1] < 0.8 * losses[0]
    opt = optimizer(tcfg, 10)
    step = make_train_step(SMALL, tcfg, opt)
    trainable, frozen = split_trainable(small_params, SMALL, tcfg, jax.random.key(1))
    state = init_state(trainable, opt, jax.random.key(3))
    for _ in range(3):
        state, _ = step(state, frozen, Shapes(1, 4, 32).stack(b))
    assert step._cache_size() == 1


@pytest.mark.parametrize("remat", ["block", "full"])
def test_remat_policies_give_the_same_step(small_params, remat):
    b = rows(2)
    ref, mr = _step(TCFG, small_params, b, 1, 2)
    got, mg = _step(dataclasses.replace(TCFG, remat=remat), small_params, b, 1, 2)
    np.testing.assert_allclose(float(mg[0]["grad_norm"]), float(mr[0]["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(got["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_nonfinite_step_changes_nothing(small_params):
    bad = {**small_params, "final_norm": small_params["final_norm"].at[0].set(jnp.nan)}
    opt = optimizer(TCFG, 10)
    trainable, frozen = split_trainable(bad, SMALL, TCFG, jax.random.key(1))
    state = init_state(trainable, opt, jax.random.key(3))
    before = jax.tree.map(np.asarray, state["params"])
    state, m = make_train_step(SMALL, TCFG, opt)(state, frozen, Shapes(1, 2, 32).stack(rows(2)))
    assert not bool(m["finite"]) and int(state["step"]) == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_lora_dropout_changes_training_only(small_params):
    """Dropout changes the training update and nothing else: the eval step scores adapters as the reference
    forward does without dropout, and the merged weights that generation runs on are the same."""
    b = rows(2)
    tcfg = dataclasses.replace(TCFG, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    plain, _ = _step(TCFG, small_params, b, 1, 2)
    dropped, _ = _step(tcfg, small_params, b, 1, 2)
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(plain["params"]),
                                                      jax.tree.leaves(dropped["params"])))

    adapters, batch = dropped["params"], {k: jnp.asarray(v) for k, v in b.items()}
    ref_s, ref_c = full_loss(lora.attach(small_params, adapters), b, SMALL, TCFG.lora)
    for cfg in (TCFG, tcfg):
        s, c, _ = make_eval_step(SMALL, cfg)(adapters, small_params, batch)
        assert float(c) == float(ref_c)
        np.testing.assert_allclose(float(s), float(ref_s), rtol=1e-5)
    with_dropout, without = lora.merge(small_params, adapters, tcfg.lora), lora.merge(small_params, adapters,
                                                                                        TCFG.lora)
    for x, y in zip(jax.tree.leaves(with_dropout), jax.tree.leaves(without)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_full_fine_tuning_trains_every_weight(small_params):
    tcfg = dataclasses.replace(TCFG, tune="full", lr=1e-3)
    state, [m] = _step(tcfg, small_params, rows(2), 1, 2)
    assert bool(m["finite"])
    changed = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(state["params"]), jax.tree.leaves(small_params))]
    assert all(changed)


def test_loss_memory_stays_far_below_full_logits():
    """With Gemma's 256k vocabulary, the compiled train step's temporaries are far below one [B, T, V] array.
    They scale with loss_chunk: about 3 [chunk, V] float32 arrays live while a chunk's loss and its gradient are
    made (0.20x the full logits at chunk 128 for this batch, 0.33x at 256)."""
    cfg = ModelConfig(vocab_size=256000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32)
    B, T = 2, 1024
    tcfg = dataclasses.replace(TCFG, batch_size=B, loss_chunk=128, lora=LoraConfig(rank=4))
    opt = optimizer(tcfg, 10)
    base = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0), jnp.float32))
    trainable = jax.eval_shape(lambda: lora.init_adapters(cfg, tcfg.lora, jax.random.key(0)))
    state = jax.eval_shape(lambda t: init_state(t, opt, jax.random.key(0)), trainable)
    batch = {k: jax.ShapeDtypeStruct((1, B, T), jnp.float32 if k == "weights" else jnp.int32)
             for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    compiled = make_train_step(cfg, tcfg, opt).lower(state, base, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = B * T * cfg.vocab_size * 4
    assert temp < 0.3 * full_logits, (temp, full_logits)


@pytest.mark.parametrize("rslora", [False, True])
def test_fresh_adapters_leave_the_base_model_exactly(small_params, rslora):
    """B starts at zero: step 0 of LoRA training is the base model, bit for bit, whatever A is."""
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=rslora)
    adapters = lora.init_adapters(SMALL, cfg, jax.random.key(7))
    assert all(float(jnp.abs(ab["a"]).max()) > 0 and not jnp.any(ab["b"]) for ab in adapters.values())
    tokens = jnp.asarray(rng.randint(0, SMALL.vocab_size, (2, 24)))
    base = M.forward(small_params, tokens, SMALL)
    np.testing.assert_array_equal(np.asarray(M.forward(lora.attach(small_params, adapters), tokens, SMALL,
                                                       adapter=cfg)), np.asarray(base))


def test_training_continues_from_a_peft_adapter(small_params, tmp_path):
    """--adapter DIR starts from that adapter (here in PEFT's format) instead of fresh ones; other LoRA settings
    than the adapter's are refused by name."""
    from gemmatune.convert.peft import load_any_adapter, save_peft
    from gemmatune.errors import GemmatuneError

    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    adapters = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(5), a.shape),
                            lora.init_adapters(SMALL, cfg, jax.random.key(4)))
    save_peft(tmp_path / "peft", adapters, cfg, SMALL, "base")
    tcfg = dataclasses.replace(TCFG, lora=LoraConfig(rank=4, alpha=8.0, targets=("down", "q", "v"), dropout=0.1),
                               adapter=str(tmp_path / "peft"))
    loaded = load_any_adapter(tcfg.adapter, SMALL)
    trainable, frozen = split_trainable(small_params, SMALL, tcfg, jax.random.key(1), loaded)
    assert frozen is small_params
    for x, y in zip(jax.tree.leaves(trainable), jax.tree.leaves(adapters)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    with pytest.raises(GemmatuneError, match="rank 4.*set the same lora"):
        split_trainable(small_params, SMALL, dataclasses.replace(tcfg, lora=LoraConfig(rank=8)), jax.random.key(1),
                        loaded)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay_to_the_floor(kind):
    from gemmatune.step import schedule

    tcfg = dataclasses.replace(TCFG, lr=1e-3, schedule=kind, warmup_steps=10, min_lr_ratio=0.1)
    lr = schedule(tcfg, 110)
    np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10))], [0.0, 5e-4, 1e-3], rtol=1e-6)
    mid, end = float(lr(60)), float(lr(110))
    want = {"cosine": (5.5e-4, 1e-4), "linear": (5.5e-4, 1e-4), "constant": (1e-3, 1e-3)}[kind]
    np.testing.assert_allclose([mid, end], want, rtol=1e-5)
