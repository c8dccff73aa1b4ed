"""convert/common.py, what the converters share: the dtype rule, the layer stacks, JSON reading and the errors that
name a file and field; and that no module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import gemmatune
from gemmatune.config import LoraConfig
from gemmatune.convert.common import fields_of, load_dtype, read_json, set_layer, zero_stacks
from gemmatune.errors import GemmatuneError

SRC = Path(gemmatune.__file__).parent


@pytest.mark.parametrize("requested, stored, loaded", [
    ("auto", ml_dtypes.bfloat16, ml_dtypes.bfloat16),
    ("auto", np.float32, np.float32),
    ("auto", np.float16, np.float32),  # float16 overflows in Gemma: never computed in
    ("float32", ml_dtypes.bfloat16, np.float32),
    ("bfloat16", np.float32, ml_dtypes.bfloat16),
])
def test_the_dtype_rule(requested, stored, loaded):
    assert load_dtype(requested, np.dtype(stored)) == np.dtype(loaded)


def test_float16_is_refused_with_the_reason():
    with pytest.raises(GemmatuneError, match="'float16' is not one of auto, float32, bfloat16 .float16 overflows"):
        load_dtype("float16", np.dtype(np.float16))


def test_layers_are_placed_into_zero_stacks():
    f32 = np.dtype(np.float32)
    stacks = zero_stacks((("w", jax.ShapeDtypeStruct((3, 2), f32)), ("v", jax.ShapeDtypeStruct((3, 4), f32))),
                         None)  # {name: [L, ...]}
    stacks = set_layer(stacks, {"w": jnp.ones(2, jnp.bfloat16), "v": jnp.full(4, 2.0)}, 1)
    assert stacks["w"].dtype == jnp.float32  # a layer takes the stack's dtype
    np.testing.assert_array_equal(stacks["w"], [[0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(stacks["v"][1], [2, 2, 2, 2])
    assert not stacks["v"][0].any() and not stacks["v"][2].any()


@pytest.mark.parametrize("text, message", [
    (None, "x.json: missing; re-export it."),
    ("{oops", "x.json: not valid JSON (.*); re-export it."),
    ("[1, 2]", "x.json: expected a JSON object; re-export it."),
])
def test_read_json_names_the_file(tmp_path, text, message):
    if text is not None:
        (tmp_path / "x.json").write_text(text)
    with pytest.raises(GemmatuneError, match=message):
        read_json(tmp_path / "x.json", "re-export it")


def test_fields_of_names_the_file_and_the_field(tmp_path):
    path, d = tmp_path / "adapter_config.json", {"rank": "four"}
    with pytest.raises(GemmatuneError, match=r"adapter_config.json: missing field 'alpha'; re-export it\."):
        with fields_of(path, "re-export it"):
            d["alpha"]
    with pytest.raises(GemmatuneError, match=r"adapter_config.json: a field has the wrong type \(invalid literal"):
        with fields_of(path, "re-export it"):
            int(d["rank"])
    with pytest.raises(GemmatuneError, match=r"adapter_config.json: lora.rank"):
        with fields_of(path, "re-export it"):
            LoraConfig(rank=0)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gemmatune"):
                offenders += [f"{f.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert offenders == []


def test_converters_import_at_the_top():
    """No import inside a function of convert/ or export.py to dodge an import cycle (h5py, an optional reader of
    one format, is the exception)."""
    lazy = []
    for f in [*(SRC / "convert").glob("*.py"), SRC / "export.py"]:
        for fn in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{f.name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))
                         and not (isinstance(n, ast.Import) and [a.name for a in n.names] == ["h5py"])]
    assert lazy == []
