"""`gemmatune plan`: the real train step compiled ahead of time for a device, from shapes alone."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmatune.config import PRESETS, LoraConfig, TrainConfig
from gemmatune.errors import GemmatuneError
from gemmatune.layout import adapter_shapes, nbytes, param_shapes, param_structs
from gemmatune.plan import DEVICES, GiB, plan
from gemmatune.platforms import installed_plugins


def _tcfg(seq: int, batch: int, remat: str = "block", **kw) -> TrainConfig:
    base = TrainConfig()
    return dataclasses.replace(base, data=dataclasses.replace(base.data, max_seq_len=seq), batch_size=batch,
                               remat=remat, **kw)


def _count(shapes: dict) -> int:
    return sum(math.prod(s) for s in _leaves(shapes))


def _leaves(tree: dict) -> list[tuple[int, ...]]:
    out = []
    for v in tree.values():
        out += _leaves(v) if isinstance(v, dict) else [v]
    return out


# The goals: the released models at these shapes fit these devices (with layers recomputed in the backward
# pass). Compiling the real step with XLA's TPU compiler takes one to three minutes each on 2 cores.
GOALS = [("gemma2-9b", "tpu-v3", 8), ("gemma2-27b", "tpu-v3", 4), ("gemma2-2b", "t4", 4)]


@pytest.mark.slow
@pytest.mark.parametrize("model, device, batch", GOALS, ids=[g[0] for g in GOALS])
def test_goals_fit(model: str, device: str, batch: int) -> None:
    cfg, kind = PRESETS[model], DEVICES[device]
    [p] = plan(cfg, _tcfg(1024, batch, "full"), device, suggest=False)
    assert p.fits and p.bytes["total"] <= kind.memory, p
    assert p.bytes["total"] == sum(p.bytes[k] for k in ("weights", "adapters", "optimizer", "activations", "other"))
    # Weights: bfloat16, split over the mesh's model axis; at most 1% of their bytes replicated on every device.
    n = math.prod(p.mesh.values())
    full = 2 * _count(param_shapes(cfg))
    assert full / n <= p.bytes["weights"] <= 1.01 * full / n
    # Adapters in float32, Adam's two moments in float32 beside them (the rank axis and A's hidden axis replicated).
    adapters = 4 * _count(adapter_shapes(cfg, LoraConfig()))
    assert adapters / n <= p.bytes["adapters"] <= adapters
    assert p.bytes["optimizer"] >= 2 * p.bytes["adapters"]
    assert 0 < p.bytes["activations"] < kind.memory


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (gemmatune[tpu])")
def test_gemma3_plan_counts_qk_norms_and_copies_no_layers() -> None:
    """Gemma 3 1B (26 layers: four repeats of 5 local + 1 global, then 2 local) on a T4: the weights are every
    parameter in bfloat16, QK-norm weights included, and the step's temporaries hold no copy of the layer stack
    (slicing the stack into the two scanned segments would copy all of it)."""
    cfg = PRESETS["gemma3-1b"]
    assert param_shapes(cfg)["layers"]["q_norm"] == (26, 256) == param_shapes(cfg)["layers"]["k_norm"]
    [p] = plan(cfg, _tcfg(256, 1, "full"), "t4", suggest=False)
    assert p.fits and p.bytes["weights"] == 2 * _count(param_shapes(cfg))
    layers = 2 * _count(param_shapes(cfg)["layers"])
    assert p.bytes["activations"] < layers, (p.bytes["activations"], layers)


def test_suggestions_try_cheapest_first_until_one_fits() -> None:
    """A device too small for the asked plan: remat full is tried first, then halving the micro-batch (doubling
    accumulation), up to the first that fits."""
    cfg = PRESETS["tiny"]
    asked = plan(cfg, _tcfg(128, 4, "none"), "cpu", suggest=False)[0]
    first_try = plan(cfg, _tcfg(128, 4, "full"), "cpu", suggest=False)[0]
    assert first_try.bytes["activations"] < asked.bytes["activations"]
    limit = (first_try.bytes["total"] - 1) / GiB  # remat full alone is not enough
    plans = plan(cfg, _tcfg(128, 4, "none"), "cpu", memory=int(limit * GiB))
    assert not plans[0].fits and plans[-1].fits and not any(p.fits for p in plans[:-1])
    assert [p.changes for p in plans[:3]] == ["", "--remat full", "--remat full --batch-size 2 --grad-accum 2"]
    assert plans[-1].bytes["total"] <= limit * GiB < plans[1].bytes["total"]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    from gemmatune.cli import main

    assert main(["plan", "--model", "tiny", "--device", "cpu", "--seq-len", "64", "--batch-size", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["devices"] == 1 and out["mesh"] == {"data": 1, "fsdp": 1, "model": 1}
    assert out["bytes"]["total"] == sum(v for k, v in out["bytes"].items() if k != "total") > 0
    assert out["bytes"]["weights"] == nbytes(param_structs(PRESETS["tiny"], "bfloat16"))  # every parameter, bfloat16
    assert main(["plan", "--model", "tiny", "--device", "cpu", "--seq-len", "64", "--batch-size", "2",
                 "--memory-gib", "0.001"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "tried --remat full" in text


def test_quantized_weights_are_counted_exactly() -> None:
    """--quantize nf4: the plan's weights are the quantized base's bytes, field by field (packed codes, code books,
    float32 scales; embedding and norms in bfloat16), as the step takes them (test_cli_json checks the bfloat16
    base's). The text output says the base is quantized."""
    from gemmatune.cli import format_plan

    cfg, tcfg = PRESETS["tiny"], _tcfg(64, 2, quantize="nf4")
    [p] = plan(cfg, tcfg, "cpu", suggest=False)
    assert p.bytes["weights"] == nbytes(param_structs(cfg, "bfloat16", tcfg.quantization()))
    # By hand: each projection's n weights as n / 2 bytes of codes and n / 64 float32 scales, and a 16-entry
    # float32 code book per projection and layer, in place of 2 n bytes.
    projections = _count({k: v for k, v in param_shapes(cfg)["layers"].items() if k.endswith("_proj")})
    assert 2 * _count(param_shapes(cfg)) - p.bytes["weights"] == 2 * projections - (
        projections // 2 + 4 * projections // 64 + 7 * cfg.num_layers * 16 * 4)
    # The adapters (float32) and Adam's moments do not depend on how the base is stored.
    assert p.bytes["adapters"] == 4 * _count(adapter_shapes(cfg, LoraConfig())) <= p.bytes["optimizer"] / 2
    assert "(weights: the base's projections quantized (nf4, block 64)" in format_plan(p)


def test_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PRESETS["tiny"]
    with pytest.raises(GemmatuneError, match="'a800' is not one of t4, l4"):
        plan(cfg, _tcfg(64, 2), "a800")
    with pytest.raises(GemmatuneError, match="--devices 3: plans for tpu-v3 cover 2, 8, 32"):
        plan(cfg, _tcfg(64, 2), "tpu-v3", devices=3)
    with pytest.raises(GemmatuneError, match="batch_size: 3 rows do not divide among the mesh's 2"):
        plan(cfg, _tcfg(64, 3), "cpu", devices=2, mesh="data=2")
    with pytest.raises(GemmatuneError, match="--attention flash: a GPU kernel is planned only on the GPU itself"):
        plan(cfg, _tcfg(64, 2, attention="flash"), "h100")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(GemmatuneError, match=r"pip install 'gemmatune\[tpu\]'"):
        plan(cfg, _tcfg(64, 2), "t4")


@pytest.mark.skipif(any("cuda" in n for n in installed_plugins()), reason="this machine has JAX's CUDA backend")
def test_gpu_plans_on_this_machines_gpu_and_says_so_without_one(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--device gpu compiles with the local CUDA backend: without JAX's CUDA plugin the command says so in one line
    before starting anything; with the plugin but no GPU, the compiling child says JAX found none."""
    from gemmatune import plan as plan_module
    from gemmatune.cli import main

    assert main(["plan", "--model", "tiny", "--device", "gpu", "--seq-len", "64", "--batch-size", "1",
                 "--attention", "flash"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --device gpu plans on this machine's GPU with JAX's CUDA "
                                                   "backend, which is not installed here")
    monkeypatch.setattr(plan_module, "_require_cuda", lambda: None)  # as if the plugin were there
    with pytest.raises(GemmatuneError, match=r"--device gpu plans on this machine's GPU, and JAX found none it can "
                                             r"use \(Unknown backend"):
        plan(PRESETS["tiny"], _tcfg(64, 1), "gpu")


def test_the_suggested_fsdp_mesh_fits_the_batch() -> None:
    """The last suggestion splits the weights over fsdp, whose groups take whole rows: as many as divide the batch,
    the model axis the rest, and none when one row cannot be split."""
    from gemmatune.plan import _candidates

    def meshes(batch: int) -> list[str]:
        return [c["mesh"] for c in _candidates(_tcfg(64, batch, "full"), "", 8, PRESETS["tiny"])]

    assert meshes(8)[-1] == "fsdp=8" and meshes(2)[-1] == "fsdp=2,model=4" and meshes(6)[-1] == "fsdp=2,model=4"
    assert meshes(1) == []  # remat is full already, and one row neither halves nor splits among fsdp groups


@pytest.mark.slow
def test_the_default_mesh_fits_the_batch() -> None:
    """tiny's 2 key/value heads on 4 devices would put model=2 and data=2 by default, which 1 row cannot fill: the
    data axis shrinks to a divisor of the batch and the model axis takes the rest."""
    [p] = plan(PRESETS["tiny"], _tcfg(64, 1), "cpu", devices=4, suggest=False)
    assert p.fits and p.mesh == {"data": 1, "fsdp": 1, "model": 4}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (gemmatune[tpu])")
def test_plans_while_another_process_holds_libtpu(tmp_path: Path) -> None:
    """A training run on a TPU VM, or another plan, holds /tmp/libtpu_lockfile while it runs; planning compiles
    only, so it neither needs nor takes the lock."""
    holder = tmp_path / "hold.py"
    holder.write_text("import sys\nfrom jax.experimental import topologies\n"
                      "topologies.get_topology_desc(topology_name='v5e:1x1', platform='tpu', "
                      "chips_per_host_bounds=(1, 1, 1))\nprint('loaded', flush=True)\nsys.stdin.read()\n")
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    env.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v3-8",
               TPU_WORKER_HOSTNAMES="localhost")
    with subprocess.Popen([sys.executable, str(holder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            # It loads libtpu and holds the lock, unless a process outside this test holds it already.
            if proc.stdout.readline() != "loaded\n":
                assert "lockfile" in proc.stderr.read()
            [p] = plan(PRESETS["tiny"], _tcfg(64, 1), "tpu-v5e", devices=1, suggest=False)
            assert p.fits and p.bytes["weights"] > 0
        finally:
            proc.kill()


def test_a_distillation_plan_counts_the_teacher() -> None:
    """--method distill: the teacher's weights share the devices and count among the weights (a note says how
    much); from a teacher cache there is no teacher, and the batches carry its top-k instead."""
    from gemmatune.cli import format_plan

    cfg = PRESETS["tiny"]
    teacher = dataclasses.replace(cfg, hidden_size=2 * cfg.hidden_size, intermediate_size=2 * cfg.intermediate_size)
    tcfg = _tcfg(64, 2, method="distill", teacher="big")
    [p] = plan(cfg, tcfg, "cpu", suggest=False, teacher=teacher)
    student, theirs = nbytes(param_structs(cfg, "bfloat16")), nbytes(param_structs(teacher, "bfloat16"))
    assert p.bytes["weights"] == student + theirs
    assert f"(weights: {theirs / GiB:.2f} GiB of them the teacher's)" in format_plan(p)
    [cached] = plan(cfg, dataclasses.replace(tcfg, teacher_cache="dir", kd_topk=8), "cpu", suggest=False)
    assert cached.bytes["weights"] == student
    # "other" also holds the step's small outputs; the cache adds two [1, B, T, K] arrays of 4-byte items
    assert cached.bytes["other"] - p.bytes["other"] == 2 * (2 * 64 * 8 * 4)
