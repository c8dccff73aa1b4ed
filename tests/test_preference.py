"""DPO and its variants against an independent computation: transformers' Gemma 2 with peft's LoRA runs each chosen
and rejected response unpacked, on its own, and TRL's loss formulas (written out here in PyTorch) turn its
log-probabilities into losses and metrics, which must equal what gemmatune's objective makes of the same pairs
packed several to a row. Also: the reference model is the starting adapter when a run starts from one, gradient
accumulation is exact for pairs, `pair_logps` on a hand-made layout, and no attention across packed pairs.

The pairs come out of the data pipeline (Formatter.encode_pair with the embedded tokenizer, a store,
BatchIterator(pairs=True)); everything is float32. One jitted function computes every loss kind at once, so each
model layout compiles once."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, hf_model
from gemmatune.config import DEFAULT_MODEL, DataConfig, LoraConfig, TrainConfig
from gemmatune.convert.peft import save_peft
from gemmatune.data.formats import PREFERENCE, Formatter, Layout
from gemmatune.data.loader import BatchIterator, ExampleStore, StoreWriter
from gemmatune.data.packing import build_rows
from gemmatune.data.records import Pair
from gemmatune.layout import adapter_shapes, is_shape, param_shapes
from gemmatune.preference import pair_logps
from gemmatune.step import Shapes, init_state, make_train_step, objective
from gemmatune.tokenizer import load_tokenizer

CFG = dataclasses.replace(SMALL, vocab_size=4096)  # the embedded tokenizer's vocabulary
LORA = LoraConfig(rank=4, alpha=8.0)
TCFG = TrainConfig(method="dpo", dtype="float32", lora=LORA, remat="none", loss_chunk=80, dpo_beta=0.3,
                   simpo_gamma=0.8, lr=1e-2, clip_norm=0.0)
B, T = 4, 192  # one batch holds every pair, two or three to a row
# name -> (dpo_loss, label smoothing); one jitted function computes them all.
KINDS = {"sigmoid": ("sigmoid", 0.0), "sigmoid-smoothed": ("sigmoid", 0.2), "ipo": ("ipo", 0.0),
         "simpo": ("simpo", 0.0), "orpo": ("orpo", 0.0)}
WITH_REFERENCE = ("sigmoid", "ipo")
METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
           "logps_rejected")

ROWS = [("Name a colour.", "Blue.", "Seven, I think."),
        ("What is two plus two?", "Four.", "Twenty-two, because the digits go side by side."),
        ("Say hello.", "Hello there, friend!", "No."),
        ("Which is larger, a cat or a mouse?", "A cat.", "A mouse is larger than most cats."),
        ("Spell dog backwards.", "god", "dgo"),
        ("Is water wet?", "Yes, water makes things wet.", "Only on Tuesdays."),
        ("Count to three.", "One, two, three.", "Three, two, one, zero."),
        ("Give me a fruit.", "An apple.", "A chair is a fruit."),
        ("What do bees make?", "Honey.", "Bees make small metal boxes for the winter months."),
        ("Where does the sun rise?", "In the east.", "In the west, every morning.")]


def tcfg(name: str, **kw) -> TrainConfig:
    loss, smoothing = KINDS[name]
    return dataclasses.replace(TCFG, dpo_loss=loss, dpo_label_smoothing=smoothing, **kw)


def random_adapters(seed: int) -> dict:
    """B nonzero, scaled so the policy's log-probabilities move by a few nats per response. numpy: jax.random
    would compile one program per shape."""
    rng = np.random.default_rng(seed)
    return {name: {"a": (rng.normal(size=s["a"]) / math.sqrt(math.prod(s["a"][1:-1]))).astype(np.float32),
                   "b": (0.05 * rng.normal(size=s["b"])).astype(np.float32)}
            for name, s in adapter_shapes(CFG, LORA).items()}


# --- the pairs, packed by the data pipeline ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    formatter = Formatter(DataConfig(), load_tokenizer(DEFAULT_MODEL), Layout(PREFERENCE, "preference pairs"))
    return [formatter.encode_pair({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in ROWS]


@pytest.fixture(scope="module")
def packed(pairs, tmp_path_factory) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """(one batch [B, T] holding every pair, each row's store indices left to right: 2i chosen, 2i + 1 rejected)."""
    path = tmp_path_factory.mktemp("prefs") / "store"
    with StoreWriter(path) as w:
        for pair in pairs:
            w.append(pair.chosen)
            w.append(pair.rejected)
    store = ExampleStore(path)
    it = BatchIterator(store, np.arange(len(store)), seq_len=T, batch_size=B, pad_id=0, shuffle_buffer=64, seed=0,
                       shuffle=False, pairs=True)
    batch, plan = next(it), it.row_plan()
    with pytest.raises(StopIteration):
        next(it)  # one batch holds them all
    assert sorted(np.concatenate(plan).tolist()) == list(range(2 * len(pairs)))
    assert max(len(row) for row in plan) >= 6  # packing is exercised: a row of three pairs
    return {k: v for k, v in batch.items() if k != "epoch"}, plan


def jnp_batch(rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in rows.items()}


# --- gemmatune: every loss kind in one jitted function -----------------------------------------------------------

@pytest.fixture(scope="module")
def params() -> dict:
    """conftest.strong_params's recipe (norms far from 0, large post-norms and final norm) in numpy: jax.random
    would compile one program per shape, seconds on this machine."""
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(CFG), is_leaf=is_shape)
    out = []
    for path, shape in leaves:
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            a = (5.0 if "post_" in name else 4.5 if "final" in name else 0.5) + 0.1 * rng.normal(size=shape)
        elif "embed" in name:
            a = 0.1 * rng.normal(size=shape)
        else:
            a = rng.normal(size=shape) / math.sqrt(shape[1] * (shape[2] if "o_proj" in name else 1))
        out.append(jnp.asarray(a, jnp.float32))
    return jax.tree.unflatten(treedef, out)


@pytest.fixture(scope="module")
def scores():
    """jit(trainable, frozen, batch) -> {name: (loss sum, count, metric sums)}: step.objective of every kind with
    the base as the reference, and (name + "@start") of the kinds with a reference model started from an adapter
    (--adapter), whose reference is frozen["reference"]. One compilation for every test here."""
    fns = {name: objective(CFG, tcfg(name)) for name in KINDS}
    fns |= {name + "@start": objective(CFG, tcfg(name, adapter="start-adapter")) for name in WITH_REFERENCE}
    return jax.jit(lambda trainable, frozen, batch: {n: f(trainable, frozen, batch, None) for n, f in fns.items()})


@pytest.fixture(scope="module")
def policy() -> dict:
    return random_adapters(1)


@pytest.fixture(scope="module")
def start() -> dict:
    return random_adapters(2)


def run(scores, trainable: dict, params: dict, start: dict, rows: dict[str, np.ndarray]) -> dict:
    return jax.tree.map(np.asarray, scores(trainable, {**params, "reference": start}, jnp_batch(rows)))


@pytest.fixture(scope="module")
def ours(scores, params, policy, start, packed) -> dict:
    """Every kind's (loss sum, count, metric sums) of the policy on the packed pairs."""
    return run(scores, policy, params, start, packed[0])


# --- the reference: transformers + peft, each response unpacked, TRL's formulas -----------------------------------

@pytest.fixture(scope="module")
def torch_model(params, policy, start, tmp_path_factory):
    """Gemma2ForCausalLM holding the same weights, with two PEFT adapters loaded by peft from PEFT-format files:
    "policy" and "start"."""
    d = tmp_path_factory.mktemp("peft")
    model = peft.PeftModel.from_pretrained(hf_model(CFG, params), save_peft(d / "policy", policy, LORA, CFG, "base"),
                                           adapter_name="policy")
    model.load_adapter(save_peft(d / "start", start, LORA, CFG, "base"), adapter_name="start")
    return model.eval()


def torch_logps(model, pairs: list[Pair], adapter: str | None) -> dict[str, torch.Tensor]:
    """Each response's summed log-probability of its trained tokens (the Example's mask) and their count, [n]
    float64, the 2n responses run as one right-padded batch; adapter None: PEFT's adapters disabled (the base)."""
    examples = [e for p in pairs for e in (p.chosen, p.rejected)]
    n = max(len(e.tokens) for e in examples)
    tokens = torch.zeros(len(examples), n, dtype=torch.long)
    attention = torch.zeros(len(examples), n, dtype=torch.long)
    mask = torch.zeros(len(examples), n - 1, dtype=torch.float64)
    for i, e in enumerate(examples):
        tokens[i, :len(e.tokens)] = torch.from_numpy(e.tokens.astype(np.int64))
        attention[i, :len(e.tokens)] = 1
        mask[i, :len(e.tokens) - 1] = torch.from_numpy(e.mask[1:].astype(np.float64))
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=tokens, attention_mask=attention).logits
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=tokens, attention_mask=attention).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0].double()
    sums, counts = (logp * mask).sum(-1), mask.sum(-1)
    return {"chosen": sums[0::2], "rejected": sums[1::2], "n_chosen": counts[0::2], "n_rejected": counts[1::2]}


def trl(kind: str, smoothing: float, p: dict, r: dict | None, beta: float = TCFG.dpo_beta,
        gamma: float = TCFG.simpo_gamma) -> dict[str, float]:
    """TRL's losses and logged metrics per pair, summed over pairs: DPOTrainer (sigmoid, ipo), CPOTrainer (simpo,
    cpo_alpha 0) and ORPOTrainer (orpo; its NLL term taken per pair: the chosen response's mean)."""
    pc, pr = p["chosen"], p["rejected"]
    if kind in ("ipo", "simpo", "orpo"):  # TRL averages the log-probabilities over each response's tokens
        pc, pr = pc / p["n_chosen"], pr / p["n_rejected"]
    if kind in ("sigmoid", "ipo"):
        rc, rr = r["chosen"], r["rejected"]
        if kind == "ipo":
            rc, rr = rc / r["n_chosen"], rr / r["n_rejected"]
        logits = (pc - pr) - (rc - rr)
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
        else:
            losses = (logits - 1 / (2 * beta)) ** 2
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    elif kind == "simpo":
        logits = (pc - pr) - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
        chosen, rejected = beta * pc, beta * pr
    else:
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        losses = -pc - beta * F.logsigmoid(log_odds)
        chosen, rejected = beta * pc, beta * pr
    per_pair = {"loss": losses, "rewards_chosen": chosen, "rewards_rejected": rejected,
                "reward_accuracy": (chosen > rejected).double(), "reward_margin": chosen - rejected,
                "logps_chosen": p["chosen"], "logps_rejected": p["rejected"]}  # gemmatune logs the sums
    return {k: float(v.sum()) for k, v in per_pair.items()}


@pytest.fixture(scope="module")
def torch_runs(torch_model, pairs) -> dict[str, dict[str, torch.Tensor]]:
    """The responses' log-probabilities under the policy adapter, the start adapter and the base (adapters off)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (50x slower on a busy machine)
    try:
        return {name: torch_logps(torch_model, pairs, None if name == "base" else name)
                for name in ("policy", "start", "base")}
    finally:
        torch.set_num_threads(threads)


def assert_matches(got: tuple, want: dict[str, float], n: int) -> None:
    total, count, sums = got
    assert float(count) == n  # every pair, and only pairs, counted
    for name, value in [("loss", total), *sums.items()]:
        # Summed log-probabilities are about -100: float32 rounds them at ~1e-5 relative.
        np.testing.assert_allclose(float(value), want[name], rtol=1e-5, atol=1e-5 * n, err_msg=name)
    assert set(sums) == set(METRICS)


# --- 1. TRL's formulas, base as the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(KINDS))
def test_losses_equal_trl_on_transformers_and_peft(name, ours, torch_runs, pairs):
    """Packed pairs, gemmatune = each response unpacked in transformers + peft with TRL's formulas; the
    reference is the same PeftModel with its adapter disabled."""
    kind, smoothing = KINDS[name]
    runs = torch_runs
    want = trl(kind, smoothing, runs["policy"], runs["base"])
    # The comparison can fail: the adapter moves the responses' log-probabilities by nats, the pairs disagree.
    assert float((runs["policy"]["chosen"] - runs["base"]["chosen"]).abs().mean()) > 1.0
    assert 0 < want["reward_accuracy"] < len(pairs)
    assert_matches(ours[name], want, len(pairs))


# --- 2. the reference is the starting adapter ---------------------------------------------------------------------

@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_reference_is_the_starting_adapter(name, ours, torch_runs, pairs):
    """--adapter: the reference is the adapter the run started from (frozen["reference"]), in torch the
    PeftModel with the "start" adapter; the policy is another adapter."""
    want = trl(name, 0.0, torch_runs["policy"], torch_runs["start"])
    assert abs(want["loss"] - trl(name, 0.0, torch_runs["policy"], torch_runs["base"])["loss"]) > 0.1
    assert_matches(ours[name + "@start"], want, len(pairs))


def test_step_zero_rewards_are_exactly_zero(scores, params, start, packed, pairs):
    """policy == reference (a run's first step from --adapter): rewards and margin exactly 0, no pair counted
    as won, the sigmoid loss log 2 per pair and IPO's (1 / (2 beta))^2."""
    got = run(scores, start, params, start, packed[0])
    n = len(pairs)
    for name in WITH_REFERENCE:
        total, count, sums = jax.tree.map(float, got[name + "@start"])
        assert count == n
        assert sums["rewards_chosen"] == sums["rewards_rejected"] == sums["reward_margin"] == 0.0
        assert sums["reward_accuracy"] == 0.0
        assert sums["logps_chosen"] < -n  # the policy's own sums, not differences
    np.testing.assert_allclose(float(got["sigmoid@start"][0]), n * math.log(2), rtol=1e-7)
    np.testing.assert_allclose(float(got["ipo@start"][0]), n / (2 * TCFG.dpo_beta) ** 2, rtol=1e-7)


# --- 3. gradient accumulation ------------------------------------------------------------------------------------

@pytest.mark.slow  # two train steps to compile: ~25 s on 2 busy cores
def test_grad_accumulation_is_exact_for_pairs(params, policy, packed, ours, pairs):
    """2 micro-batches of 2 rows (different pair counts) = one batch of 4 rows: loss, metrics and the updated
    adapters. Plain SGD, so the update is the gradient itself (Adam's first step is lr * sign(g), blind to the
    gradient's scale). The loss and metrics are the pair means of the objective over the whole batch."""
    rows = packed[0]
    per_row = [int(s.max()) // 2 for s in rows["segment_ids"]]
    assert sum(per_row[:2]) != sum(per_row[2:]), per_row  # the micro-batches' counts differ
    results = []
    for k in (2, 1):
        cfg = tcfg("sigmoid", grad_accum=k, batch_size=B // k)
        opt = optax.sgd(1.0)
        state = init_state(jax.tree.map(jnp.asarray, policy), opt, jax.random.key(0))
        state, metrics = make_train_step(CFG, cfg, opt)(state, params, Shapes(k, B // k, T).stack(rows))
        results.append((jax.tree.map(np.asarray, state["params"]), jax.tree.map(float, metrics)))
    (p2, m2), (p1, m1) = results
    assert m1["tokens"] == m2["tokens"] == len(pairs)
    for name in ("loss", "grad_norm", *METRICS):
        np.testing.assert_allclose(m2[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)
    total, _, sums = ours["sigmoid"]
    np.testing.assert_allclose(m1["loss"], float(total) / len(pairs), rtol=1e-5)
    for name in METRICS:
        np.testing.assert_allclose(m1[name], float(sums[name]) / len(pairs), rtol=1e-5, atol=1e-6, err_msg=name)
    for x, y, z in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), jax.tree.leaves(policy)):
        scale = float(np.abs(y - z).max())
        assert scale > 0  # every adapter array has a gradient
        np.testing.assert_allclose(x - z, y - z, atol=1e-5 * scale, rtol=0)


# --- 4. pair_logps on a hand-made layout --------------------------------------------------------------------------

def test_pair_logps_sums_each_segment_and_pairs_them():
    """Per pair slot (P = T // 2), the weighted sums and counts of segments 2j - 1 (chosen) and 2j (rejected).
    Row 0: two pairs, then padding; row 1: a pair, then a chosen without its rejected; row 2: a pair, then one
    whose rejected has no trained token. Only whole pairs with trained tokens on both sides are valid."""
    segments = np.array([[1, 1, 2, 2, 2, 3, 4, 4, 0, 0],
                         [1, 2, 2, 3, 3, 3, 0, 0, 0, 0],
                         [1, 1, 2, 3, 3, 4, 4, 0, 0, 0]], np.int32)
    weights = np.array([[0, 1, 1, 0, 1, 1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 0, 1, 0, 0, 0, 0],
                        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]], np.float32)
    logps = -np.arange(1, 31, dtype=np.float32).reshape(3, 10) / 8  # distinct, so a wrong position shows
    logps[segments == 0] = -1000.0  # padding must not count (its weight is 0 anyway)
    got = pair_logps(jnp.asarray(logps), jnp.asarray(weights), jnp.asarray(segments))
    P = 5
    want = {k: np.zeros((3, P), np.float32) for k in ("chosen", "rejected", "n_chosen", "n_rejected")}
    for b in range(3):
        for t in range(10):
            s = segments[b, t]
            if s:
                side = "chosen" if s % 2 else "rejected"
                want[side][b, (s - 1) // 2] += weights[b, t] * logps[b, t]
                want["n_" + side][b, (s - 1) // 2] += weights[b, t]
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(getattr(got, k)), v, rtol=1e-6, err_msg=k)
    # spot checks by hand: row 0's first pair, row 0's second rejected
    assert float(got.chosen[0, 0]) == -2 / 8 and float(got.rejected[0, 0]) == -(3 + 5) / 8
    assert float(got.n_rejected[0, 1]) == 2
    np.testing.assert_array_equal(np.asarray(got.valid), [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])


# --- 5. packing isolates pairs ---------------------------------------------------------------------------------

def test_a_packed_pair_scores_as_if_alone(scores, params, policy, start, packed, pairs, torch_runs):
    """A pair packed third in a row behind two others (their tokens present, their weights 0) gives the log-
    probabilities of the same pair alone in a row: nothing attends across segments. Both equal torch's."""
    rows, plan = packed
    r = next(i for i, row in enumerate(plan) if len(row) >= 6)
    chosen = int(plan[r][4])  # the row's third pair
    i = chosen // 2
    behind = {k: v.copy() for k, v in rows.items()}
    behind["weights"] *= np.isin(behind["segment_ids"], [5, 6]) & (np.arange(B) == r)[:, None]
    alone = build_rows([pairs[i].chosen, pairs[i].rejected], [[0, 1]] + [[]] * (B - 1), T, 0)
    assert behind["weights"].sum() == alone["weights"].sum() > 0
    got = {}
    for name, batch in (("behind", behind), ("alone", alone)):
        total, count, sums = jax.tree.map(float, run(scores, policy, params, start, batch)["sigmoid"])
        assert count == 1
        got[name] = np.array([total, sums["logps_chosen"], sums["logps_rejected"]])
    want = torch_runs["policy"]
    np.testing.assert_allclose(got["behind"], got["alone"], rtol=1e-5)
    np.testing.assert_allclose(got["alone"][1:], [float(want["chosen"][i]), float(want["rejected"][i])], rtol=1e-5)
