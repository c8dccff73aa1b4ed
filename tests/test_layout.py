"""The import graph of the package: layered from the model and its layout at the bottom to the command line at the
top, nothing importing upward, no cycle (lazy imports inside functions count too), and the parameter layout
consistent with the model's own shapes."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import pytest

from gemmatune import layout
from gemmatune.config import PRESETS, LoraConfig

ROOT = Path(__file__).parent.parent / "src" / "gemmatune"

# Lowest first. A module may import modules of its own tier or a lower one, never a higher one.
TIERS = [
    {"errors", "config", "layout", "platforms"},  # the configuration and the parameter layout: import nothing else
    # the numbers, and the primitives every writer and reader uses
    {"attention", "flash", "sharding", "model", "lora", "quantize", "loss", "preference", "teacher", "generate",
     "atomic", "safetensors_io", "tokenizer", "distributed", "scoring"},
    {"data", "data.records", "data.packing", "data.sources", "data.formats", "data.loader", "data.pipeline",
     "data.inspect", "data.teacher_cache", "convert", "convert.common", "convert.hf", "convert.kerashub",
     "convert.peft", "convert.gguf", "convert.gguf_read",
     "checkpoint", "hub", "engine"},  # other formats in and out; the serving engine (decoding, not a format)
    {"step"},  # the compiled train and eval steps
    {"loop", "evaluation", "metrics", "trackers", "settings", "export", "plan", "server"},  # what a command drives
    {"cli", ""},  # the command line and the package's public API (gemmatune/__init__.py)
]


def _imports() -> dict[str, set[str]]:
    """Module (relative to gemmatune, "" for the package) -> the gemmatune modules it imports anywhere in its code,
    with the packages that importing a submodule runs (importing convert.hf runs convert/__init__.py)."""
    graph = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix("__init__").rstrip(".")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gemmatune"):
                base = node.module.removeprefix("gemmatune").lstrip(".")
                deps.add(base)
                if not base:  # `from gemmatune import sharding`
                    deps.update(a.name for a in node.names if (ROOT / f"{a.name}.py").exists())
            elif isinstance(node, ast.Import):
                deps.update(a.name.removeprefix("gemmatune").lstrip(".") for a in node.names
                            if a.name.split(".")[0] == "gemmatune")
        # A submodule's import runs its packages' __init__ first, except the importer's own packages: those are
        # already being imported when it runs (convert/__init__.py importing convert.hf is the package's facade).
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for d in list(deps):
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in own)
        deps.discard("")  # `from gemmatune.x import ...` runs gemmatune/__init__.py, which imports no submodule eagerly
        deps.discard(name)
        graph[name] = deps
    return graph


GRAPH = _imports()
TIER = {m: i for i, tier in enumerate(TIERS) for m in tier}


def test_every_module_has_a_tier():
    assert set(GRAPH) == set(TIER), (sorted(set(GRAPH) - set(TIER)), sorted(set(TIER) - set(GRAPH)))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_nothing_imports_upward(module):
    upward = {d: TIER[d] for d in GRAPH[module] if TIER[d] > TIER[module]}
    assert not upward, f"{module or 'gemmatune'} (tier {TIER[module]}) imports higher tiers: {upward}"


def test_no_import_cycle():
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m):], m]))
        if m in done:
            return
        for d in sorted(GRAPH[m]):
            visit(d, [*path, m])
        done.add(m)

    for m in sorted(GRAPH):
        visit(m, [])


def test_plan_compiles_the_step_without_the_loop():
    """`gemmatune plan` needs the compiled step only: nothing it imports reaches the run loop or data files."""
    seen, todo = set(), ["plan"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    assert "step" in seen and not seen & {"loop", "data.pipeline", "checkpoint", "metrics"}, sorted(seen)


@pytest.mark.parametrize("name", list(PRESETS))
def test_layout_matches_the_model(name):
    """Shapes, logical axes and adapter shapes come from one table: the model's own parameters have those shapes,
    every axis tuple has one name per dimension, and A x B has the shape of the weight it adapts."""
    from gemmatune.model import init_params

    cfg = PRESETS[name]
    shapes = layout.param_shapes(cfg)
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(tuple, shapes, is_leaf=layout.is_shape)
    ranks = jax.tree.map(lambda a, s: len(a) == len(s), layout.param_axes(cfg), shapes, is_leaf=layout.is_shape)
    assert all(jax.tree.leaves(ranks))
    for proj, ab in layout.adapter_shapes(cfg, LoraConfig(rank=3)).items():
        w, w_in, w_out = layout.weight_axes(proj)
        dims = dict(zip(w, shapes["layers"][proj][1:]))
        assert ab["a"] == (cfg.num_layers, *(dims[c] for c in w_in), 3)
        assert ab["b"] == (cfg.num_layers, 3, *(dims[c] for c in w_out))
