"""Train-state checkpoints (bit-exact round trip, template checks, pruning, survival of real SIGKILLs), adapter
files and the output-directory guard (which must never delete a user's files)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemmatune import checkpoint as ck
from gemmatune.config import LoraConfig, ModelConfig, TrainConfig
from gemmatune.errors import GemmatuneError

MODEL = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16)
# The contract's shapes, written out here rather than taken from layout.adapter_shapes, which they check.
D, F, H, K, E, L = 64, 128, 4, 2, 16, 2


def lora_tree(rank: int, targets: tuple[str, ...] = ("q", "o", "gate"), seed: int = 0) -> dict[str, Any]:
    shapes = {"q": ((L, D, rank), (L, rank, H, E)), "k": ((L, D, rank), (L, rank, K, E)),
              "o": ((L, H, E, rank), (L, rank, D)), "gate": ((L, D, rank), (L, rank, F)),
              "down": ((L, F, rank), (L, rank, D))}
    rng = np.random.default_rng(seed)
    return {f"{t}_proj": {"a": rng.normal(size=shapes[t][0]).astype(np.float32),
                          "b": rng.normal(size=shapes[t][1]).astype(np.float32)} for t in targets}


def train_state(rank: int = 4, targets: tuple[str, ...] = ("q", "o", "gate"), updates: int = 2,
                key_impl: str = "threefry2x32") -> dict[str, Any]:
    """A LoRA tree plus a bfloat16 leaf (as full fine-tuning has), under adamw after `updates` steps."""
    params = jax.tree.map(jnp.asarray, lora_tree(rank, targets))
    params["norm"] = jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(1e-2, 100)))
    opt_state = opt.init(params)
    for i in range(updates):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
        upd, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(updates),
            "rng": jax.random.split(jax.random.key(7, impl=key_impl))[updates % 2]}


def leaves_bytes(tree: Any) -> list[tuple[str, tuple[int, ...], str, bytes]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)
        out.append((jax.tree_util.keystr(path), a.shape, str(a.dtype), a.tobytes()))
    return out


# --- train-state checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_round_trip_is_bit_exact(tmp_path: Path, abstract: bool) -> None:
    state = train_state()
    meta = {"data": {"epoch": 1, "offset": 12345}, "config_digest": "abc"}
    path = ck.save_checkpoint(tmp_path, 2, state, meta, keep=3)
    assert path == tmp_path / "checkpoints" / "step-00000002"
    template = train_state(updates=0)
    if abstract:
        template = jax.eval_shape(lambda: template)
    restored, got_meta = ck.load_checkpoint(path, template)
    assert got_meta == meta
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert leaves_bytes(restored) == leaves_bytes(state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    # The key is usable as a key again, and continues the same random stream.
    assert np.array_equal(jax.random.normal(restored["rng"], (4,)), jax.random.normal(state["rng"], (4,)))


def test_numpy_and_scalar_leaves_round_trip(tmp_path: Path) -> None:
    state = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "s": 3.5, "b": np.array(True)}
    restored, _ = ck.load_checkpoint(ck.save_checkpoint(tmp_path, 0, state, {}, keep=1), state)
    assert isinstance(restored["a"], np.ndarray) and np.array_equal(restored["a"], state["a"])
    assert restored["s"] == 3.5 and restored["b"].dtype == np.bool_


@pytest.mark.parametrize("template, detail", [
    (lambda: train_state(rank=8), "shape"),  # another LoRA rank
    (lambda: train_state(targets=("q", "o", "gate", "down")), "key(s) opt_state/1/0/mu/down_proj/a, "),
    (lambda: train_state(targets=("q", "o")), "unexpected key(s) opt_state/1/0/mu/gate_proj/a"),
    (lambda: jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, train_state()),
     "dtype bfloat16"),
    (lambda: train_state(key_impl="unsafe_rbg"), "key 'rng'"),
    (lambda: {**train_state(), "rng": jnp.zeros(2, jnp.uint32)}, "PRNG key data"),
])
def test_template_mismatch_names_the_checkpoint_and_key(tmp_path: Path, template, detail: str) -> None:
    path = ck.save_checkpoint(tmp_path, 2, train_state(), {}, keep=1)
    with pytest.raises(GemmatuneError) as e:
        ck.load_checkpoint(path, template())
    msg = str(e.value)
    assert str(path) in msg and detail in msg
    assert "different configuration" in msg and "--overwrite" in msg


def test_rbg_key_and_different_impl_with_same_data_shape(tmp_path: Path) -> None:
    # rbg and unsafe_rbg keys have the same raw shape: only the stored implementation tells them apart.
    path = ck.save_checkpoint(tmp_path, 1, {"rng": jax.random.key(1, impl="rbg")}, {}, keep=1)
    restored, _ = ck.load_checkpoint(path, {"rng": jax.random.key(0, impl="rbg")})
    assert np.array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(1, impl="rbg")))
    with pytest.raises(GemmatuneError, match="is a rbg PRNG key"):
        ck.load_checkpoint(path, {"rng": jax.random.key(0, impl="unsafe_rbg")})


def test_missing_or_corrupt_checkpoint_files(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 1, {"x": np.zeros(3)}, {}, keep=1)
    (path / "meta.json").write_text("{")
    with pytest.raises(GemmatuneError, match="meta.json: not valid JSON"):
        ck.load_checkpoint(path, {"x": np.zeros(3)})
    (path / "meta.json").write_text("{}")
    (path / "state.safetensors").unlink()
    with pytest.raises(GemmatuneError, match="meta.json: no 'meta' field"):
        ck.load_checkpoint(path, {"x": np.zeros(3)})


def test_keep_prunes_oldest_and_a_saved_step_is_not_rewritten(tmp_path: Path) -> None:
    assert ck.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 10, 11):
        ck.save_checkpoint(tmp_path, step, {"x": np.full(4, step)}, {"step": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010", "step-00000011"]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000011"  # numeric, not by name
    ck.save_checkpoint(tmp_path, 11, {"x": np.full(4, -1)}, {"step": -1}, keep=2)
    state, meta = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), {"x": np.zeros(4, np.int64)})
    assert meta == {"step": 11} and state["x"][0] == 11
    with pytest.raises(TypeError):  # meta is checked before anything is written
        ck.save_checkpoint(tmp_path, 12, {"x": np.zeros(4)}, {"bad": object()}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010", "step-00000011"]


# The child saves checkpoints of a 50 MB state in a loop from the latest step on, so most of its time is spent
# inside the tensor write. With "rename" it SIGKILLs itself exactly when the written directory is renamed.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from gemmatune import checkpoint as ck
    run, mode = sys.argv[1], sys.argv[2]
    if mode == "rename":
        real = os.replace
        def replace(src, dst):
            if os.path.isdir(src) and ".partial-" in os.fspath(src):
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        os.replace = replace
    latest = ck.latest_checkpoint(run)
    step = 0 if latest is None else int(latest.name.split("-")[1]) + 1
    print("ready", flush=True)
    while True:
        ck.save_checkpoint(run, step, {"big": np.full(12_500_000, step, np.float32), "step": np.int32(step)},
                           {"step": step}, keep=2)
        step += 1
""")


def run_child(run: Path, mode: str, kill_after: float | None) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ck.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), mode], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"ready\n"
        try:
            child.wait(kill_after or 20)  # without kill_after the child must have killed itself by then
        except subprocess.TimeoutExpired:
            assert kill_after is not None, "the child never renamed a written checkpoint into place"
            child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()


def leftovers(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")}


def check_latest(run: Path) -> int:
    latest = ck.latest_checkpoint(run)
    assert latest is not None
    state, meta = ck.load_checkpoint(latest, {"big": np.zeros(12_500_000, np.float32), "step": np.int32(0)})
    step = int(latest.name.split("-")[1])
    assert meta == {"step": step} and state["step"] == step
    assert np.all(state["big"] == step)  # every byte of the big tensor made it
    return step


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ck.save_checkpoint(run, 0, {"big": np.zeros(12_500_000, np.float32), "step": np.int32(0)}, {"step": 0}, keep=2)
    # Killed between writing and renaming: the written directory must not count, the previous one still does.
    run_child(run, "rename", None)
    assert check_latest(run) == 0
    seen = leftovers(run)
    assert any(".partial-" in n for n in seen)
    rnd, steps = random.Random(0), [0]
    for _ in range(6):
        run_child(run, "loop", rnd.uniform(0.3, 1.2))
        steps.append(check_latest(run))
        assert not seen & leftovers(run), "a save must remove what earlier killed saves left"
        seen |= leftovers(run)
        # A kill between putting the new checkpoint in place and pruning the oldest leaves keep + 1.
        assert len(complete(run)) <= 3
    assert steps[-1] > 0 and steps == sorted(steps)
    # Most kills land inside the 50 MB write: if none left a partial directory, the test did not test anything.
    assert sum(".partial-" in n for n in seen) >= 3
    ck.save_checkpoint(run, steps[-1] + 1, {"x": np.zeros(1)}, {}, keep=2)
    assert not leftovers(run) and len(complete(run)) == 2  # a completed save prunes back to keep


def complete(run: Path) -> list[Path]:
    return [p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]


# --- adapter files -----------------------------------------------------------------------------------------------


LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "o", "gate"), rslora=True)


def test_adapter_round_trip(tmp_path: Path) -> None:
    params = lora_tree(4)
    out = ck.save_adapter(tmp_path / "adapter", params, LORA, MODEL, "/models/gemma-2-2b")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["format"] == "gemmatune-lora" and cfg["scale"] == pytest.approx(8.0 / 2.0)
    assert cfg["base_model"] == "/models/gemma-2-2b" and cfg["base_config"]["hidden_size"] == 64
    loaded, lora = ck.load_adapter(out, MODEL)
    assert lora == LORA
    assert leaves_bytes(loaded) == leaves_bytes(params)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_adapter_refuses_to_replace_without_force(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(GemmatuneError, match="not empty"):
        ck.save_adapter(out, lora_tree(4), LORA, MODEL, "base")
    assert (out / "old.txt").exists()
    ck.save_adapter(out, lora_tree(4), LORA, MODEL, "base", force=True)
    assert not (out / "old.txt").exists() and (out / "adapter.safetensors").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(GemmatuneError, match="not a directory"):
        ck.save_adapter(tmp_path / "file", lora_tree(4), LORA, MODEL, "base", force=True)


def test_adapter_with_wrong_shapes_is_not_written(tmp_path: Path) -> None:
    with pytest.raises(GemmatuneError, match="'q_proj.a' has shape"):
        ck.save_adapter(tmp_path / "a", lora_tree(4), dataclasses.replace(LORA, rank=8), MODEL, "base")
    with pytest.raises(GemmatuneError, match="missing k_proj.a"):
        ck.save_adapter(tmp_path / "a", lora_tree(4), dataclasses.replace(LORA, targets=("q", "k", "o", "gate")),
                        MODEL, "base")
    assert not list(tmp_path.iterdir())


def edit_config(out: Path, **changes: Any) -> None:
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("spoil, message", [
    (lambda out: (out / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (lambda out: (out / "adapter.safetensors").unlink(), "adapter.safetensors: cannot open"),
    (lambda out: (out / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda out: (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8})),
     "this is a PEFT adapter, not a gemmatune adapter"),
    (lambda out: edit_config(out, version=2), "format version 2"),
    (lambda out: edit_config(out, rank=0), "lora.rank"),
    (lambda out: edit_config(out, rank=8), "'q_proj.a' has shape (2, 64, 4), but rank 8"),
    (lambda out: edit_config(out, targets=["q", "o"]), "unexpected gate_proj.a"),
    (lambda out: edit_config(out, base_config={}), "missing field 'vocab_size'"),
    (lambda out: edit_config(out, base_config={**dataclasses.asdict(MODEL), "hidden_size": 2304, "num_layers": 26}),
     "adapter was trained on a base with hidden_size 2304, this model has 64; num_layers 26, this model has 2."),
])
def test_load_adapter_refusals(tmp_path: Path, spoil, message: str) -> None:
    out = ck.save_adapter(tmp_path / "adapter", lora_tree(4), LORA, MODEL, "/models/base")
    spoil(out)
    with pytest.raises(GemmatuneError) as e:
        ck.load_adapter(out, MODEL)
    assert message in str(e.value) and str(out) in str(e.value)


def test_load_adapter_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(GemmatuneError, match="no such adapter directory"):
        ck.load_adapter(tmp_path / "nope", MODEL)


# --- output directory guard --------------------------------------------------------------------------------------


def test_config_digest_ignores_only_fields_that_do_not_change_the_math() -> None:
    base = dataclasses.asdict(TrainConfig())
    digest = ck.config_digest(base)
    assert ck.config_digest(dict(reversed(base.items()))) == digest
    for k, v in {"max_steps": 500, "epochs": 3.0, "output": "elsewhere", "save_every": 5, "resume": True}.items():
        assert ck.config_digest({**base, k: v}) == digest, k
    assert ck.config_digest({**base, "lr": 1e-3}) != digest
    assert ck.config_digest({**base, "lora": {**base["lora"], "rank": 16}}) != digest


def start(d: Path, digest: str, *, resume: bool, overwrite: bool) -> Path | None:
    """What a run does with its --output: check it (reading only), then claim it."""
    found = ck.check_run_dir(d, digest, resume=resume, overwrite=overwrite)
    ck.claim_run_dir(d, digest, overwrite=overwrite)
    return found


def test_new_and_empty_directories_start_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "new" / "run", tmp_path / "empty"):
        assert start(d, "d1", resume=False, overwrite=False) is None
        assert json.loads((d / "run.json").read_text()) == {"config_digest": "d1"}


def test_resume(tmp_path: Path) -> None:
    with pytest.raises(GemmatuneError, match="nothing to resume .* holds no run"):
        start(tmp_path, "d1", resume=True, overwrite=False)
    start(tmp_path, "d1", resume=False, overwrite=False)
    with pytest.raises(GemmatuneError, match="nothing to resume .* no complete checkpoint"):
        start(tmp_path, "d1", resume=True, overwrite=False)
    path = ck.save_checkpoint(tmp_path, 5, {"x": np.zeros(2)}, {}, keep=1)
    assert start(tmp_path, "d1", resume=True, overwrite=False) == path
    with pytest.raises(GemmatuneError, match="differs from this one .* would not continue the same run"):
        start(tmp_path, "d2", resume=True, overwrite=False)
    with pytest.raises(GemmatuneError, match="pass only one"):
        start(tmp_path, "d1", resume=True, overwrite=True)
    (tmp_path / "run.json").unlink()  # checkpoints alone: still a run, but of an unknown configuration
    with pytest.raises(GemmatuneError, match="run.json: missing; cannot tell which configuration"):
        start(tmp_path, "d1", resume=True, overwrite=False)


def make_run(d: Path) -> None:
    start(d, "old", resume=False, overwrite=False)
    ck.save_checkpoint(d, 1, {"x": np.zeros(2)}, {}, keep=1)
    ck.save_adapter(d / "adapter", lora_tree(4), LORA, MODEL, "base")
    (d / "metrics.jsonl").write_text("{}\n")
    (d / "summary.txt").write_text("done\n")
    (d / "tensorboard").mkdir()
    (d / ".adapter.partial-99").mkdir()  # left by a killed adapter save


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    make_run(tmp_path)
    with pytest.raises(GemmatuneError, match="pass --resume to continue it or --overwrite to replace it"):
        start(tmp_path, "new", resume=False, overwrite=False)
    assert start(tmp_path, "new", resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    assert json.loads((tmp_path / "run.json").read_text()) == {"config_digest": "new"}


def test_overwrite_never_deletes_user_files(tmp_path: Path) -> None:
    make_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(GemmatuneError, match=r"files gemmatune did not write \(notes.txt\)"):
        start(tmp_path, "new", resume=False, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path, overwrite: bool) -> None:
    (tmp_path / "data.jsonl").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("{}")  # one of our names, but no run.json: the user's file
    with pytest.raises(GemmatuneError, match="not a gemmatune run; gemmatune never deletes"):
        start(tmp_path, "d", resume=False, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "metrics.jsonl"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(GemmatuneError, match="not a directory"):
        start(tmp_path / "f", "d", resume=False, overwrite=overwrite)


def test_the_check_reads_only(tmp_path: Path) -> None:
    """check_run_dir accepts a new directory without creating it, and an --overwrite without deleting anything:
    a start that fails after the check leaves --output as it was."""
    assert ck.check_run_dir(tmp_path / "new", "d", resume=False, overwrite=False) is None
    assert not (tmp_path / "new").exists()
    make_run(tmp_path / "old")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert ck.check_run_dir(tmp_path / "old", "new", resume=False, overwrite=True) is None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_leftovers_of_a_killed_start_count_as_nothing(tmp_path: Path) -> None:
    """A start killed while staging its data leaves only a hidden .data.partial-PID: the next start takes the
    directory as empty, and its claim deletes that leftover but keeps what the new start has staged."""
    (tmp_path / ".data.partial-99").mkdir()
    (tmp_path / ".data.partial-99" / "tokens.bin").write_bytes(b"x")
    (tmp_path / ".run.json.partial-98").write_text("{")
    (tmp_path / ".data.partial-7").mkdir()  # the starting run's own staging
    assert ck.check_run_dir(tmp_path, "d", resume=False, overwrite=False) is None
    ck.claim_run_dir(tmp_path, "d", overwrite=False, keep={".data.partial-7"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.partial-7", "run.json"]
    (tmp_path / ".notes.partial-1").write_text("not ours: another name")
    (tmp_path / "run.json").unlink()
    with pytest.raises(GemmatuneError, match="not a gemmatune run"):
        ck.check_run_dir(tmp_path, "d", resume=False, overwrite=False)
