"""Device meshes and the one table that says how every array is split across them.

A mesh has three named axes: "data" (rows of the batch; everything else replicated), "fsdp" (rows of the batch,
and the weights' hidden axis split too, gathered layer by layer) and "model" (tensor parallelism: attention heads,
the MLP's hidden units and the vocabulary split). Arrays name their axes logically (layout.py: "heads", "mlp",
...); RULES maps each logical axis to the mesh axes it is split over, MaxText style, so the layout of a parameter,
its LoRA adapter, its optimizer moments and the activations that flow through it all follow from the same table.

A dimension that a mesh axis does not divide (gemma2-2b's 4 key/value heads on model=8) is replicated over that
axis instead: `spec` drops mesh axes from the end of a rule until the rest divides the dimension, so any model runs
on any mesh, at the cost of some duplicated memory that `gemmatune plan` shows.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gemmatune.config import ModelConfig, Quantization
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params, is_shape, param_axes, param_shapes, per_layer

AXES = ("data", "fsdp", "model")

# Logical axis -> the mesh axes it is split over, outermost first. Weights and activations share the names, except
# the hidden axis: weights split it over fsdp ("embed"), activations keep it whole ("act_embed"), because their
# batch axis already uses fsdp.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "act_embed": (),
    "embed": ("fsdp",),
    "vocab": ("model", "fsdp"),
    "heads": ("model",),
    "kv_heads": ("model",),
    "head_dim": (),
    "mlp": ("model",),
    "layers": (),
    "lora_rank": (),
}
BATCH = ("batch", "seq")  # a batch of token rows [B, T]


# --- from logical axes to shardings -----------------------------------------------------------------------------

def spec(logical: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` with these logical axes (None: replicated). Mesh axes of size 1 are
    left out; a mesh axis already used by an earlier dimension is not used again; and mesh axes are dropped from
    the end of a rule until the rest divide the dimension (replicating it over them instead of failing)."""
    if len(logical) != len(shape):
        raise ValueError(f"{len(logical)} logical axes {tuple(logical)} for an array of shape {tuple(shape)}")
    used: set[str] = set()
    out: list[tuple[str, ...] | None] = []
    for name, dim in zip(logical, shape):
        axes = [a for a in (RULES[name] if name else ()) if mesh_shape.get(a, 1) > 1 and a not in used]
        while axes and dim % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        out.append(tuple(axes) or None)
    return PartitionSpec(*out)


def named(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical, shape, mesh.shape))


def tree_shardings(mesh: Mesh, axes: Params, shapes: Params) -> Params:
    """NamedShardings for a tree of arrays (or shapes, or ShapeDtypeStructs) given the same tree of logical axes."""
    return jax.tree.map(lambda a, s: named(mesh, a, s if isinstance(s, tuple) else s.shape), axes, shapes,
                        is_leaf=is_shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(cfg: ModelConfig, mesh: Mesh, *, stacked: bool = True, quant: Quantization | None = None
                    ) -> Params:
    """The base parameters' shardings ([L, ...] stacks, or the per-layer list that decoding takes); with `quant`,
    of the quantized projections' fields."""
    axes, shapes = param_axes(cfg, quant), param_shapes(cfg, quant)
    if stacked:
        return tree_shardings(mesh, axes, shapes)
    out = tree_shardings(mesh, per_layer(axes), per_layer(shapes))
    return {**out, "layers": [out["layers"]] * cfg.num_layers}


# --- activations ------------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("gemmatune_mesh", default=None)


@contextlib.contextmanager
def active(mesh: Mesh | None) -> Iterator[None]:
    """Within this block (entered inside a traced function), `shard` constrains activations to `mesh`. A
    one-device mesh constrains nothing, so the single-device program is unchanged."""
    token = _ACTIVE.set(mesh if mesh is not None and mesh.size > 1 else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh `shard` constrains activations to in this trace (None off a mesh)."""
    return _ACTIVE.get()


def shard(x: jax.Array, *logical: str | None) -> jax.Array:
    """Constrain an activation to the active mesh by its logical axes; returns x unchanged off-mesh."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named(mesh, logical, x.shape))


# --- meshes -----------------------------------------------------------------------------------------------------

def parse_mesh(text: str | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """"data=2,model=4" (or {"data": 2, "model": 4}) -> sizes of all three axes (1 where not given; one axis may be
    -1: whatever the others leave). The product must be the device count."""
    where = f"--mesh {text}" if isinstance(text, str) else f"mesh {dict(text)}"
    help_ = (f"write it as AXIS=SIZE pairs over {', '.join(AXES)}, e.g. --mesh data=2,model=4, whose sizes "
             f"multiply to the {n_devices} device(s)")
    sizes: dict[str, int] = {}
    items = text.items() if isinstance(text, Mapping) else (
        part.partition("=")[::2] for part in text.replace(" ", "").split(",") if part)
    for name, value in items:
        if name not in AXES:
            raise GemmatuneError(f"{where}: unknown mesh axis {name!r}; {help_}.")
        if name in sizes:
            raise GemmatuneError(f"{where}: axis {name!r} is given twice; {help_}.")
        try:
            sizes[name] = int(value)
        except (TypeError, ValueError):
            raise GemmatuneError(f"{where}: the size of {name!r} is {value!r}, not an integer; {help_}.") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise GemmatuneError(f"{where}: the size of {name!r} must be positive (or -1 for the rest); {help_}.")
    if list(sizes.values()).count(-1) > 1:
        raise GemmatuneError(f"{where}: only one axis may be -1; {help_}.")
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, size in sizes.items():
        if size == -1:
            sizes[name] = n_devices // known if n_devices % known == 0 else 0
    full = {a: sizes.get(a, 1) for a in AXES}
    if math.prod(full.values()) != n_devices:
        raise GemmatuneError(f"{where}: {' x '.join(str(full[a]) for a in AXES)} = {math.prod(full.values())} "
                             f"devices for {n_devices} available; {help_}.")
    return full


def default_mesh_shape(n_devices: int, per_host: int, cfg: ModelConfig | None = None,
                       batch_size: int | None = None) -> dict[str, int]:
    """Tensor parallelism within a host, data parallelism across hosts: "model" takes the largest share of a host's
    devices that divides the key/value heads (so no attention weight is replicated), "data" the rest. One CPU or
    GPU: a 1-device mesh. A TPU v3-8 with gemma2-9b or 27b: model=8, the weights split eight ways.

    Each data group takes whole rows, so with `batch_size` given "data" is cut to the largest size that divides both
    the batch and what "model" leaves, and "model" takes the rest (what its rules do not divide, `spec` replicates):
    gemma2-2b with batch 1 on a v5e-8 gets model=8 instead of a data=2 that one row cannot fill."""
    model = math.gcd(per_host, cfg.num_kv_heads) if cfg is not None else per_host
    data = n_devices // model
    if batch_size is not None:
        data = math.gcd(data, batch_size)
    return {"data": data, "fsdp": 1, "model": n_devices // data}


def make_mesh(spec_: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None,
              cfg: ModelConfig | None = None, batch_size: int | None = None) -> Mesh:
    """A mesh over `devices` (default: all of them, every process's): from a spec such as "data=2,model=4", or
    when the spec is None or empty the default (see `default_mesh_shape`; cfg and batch_size refine it)."""
    devices = list(jax.devices() if devices is None else devices)
    if spec_:
        sizes = parse_mesh(spec_, len(devices))
    else:
        sizes = default_mesh_shape(len(devices), max(1, len(devices) // jax.process_count()), cfg, batch_size)
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def describe(mesh: Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in AXES)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    """Each data-parallel group takes whole rows: the batch must divide among them."""
    groups = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % groups:
        raise GemmatuneError(f"batch_size: {batch_size} rows do not divide among the mesh's {groups} data-parallel "
                             f"groups (data x fsdp of --mesh {describe(mesh)}); use a multiple of {groups}, or "
                             "another --mesh.")


# --- placing host arrays ----------------------------------------------------------------------------------------

def place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array -> a global array with `sharding`: each of this process's devices receives only its slice,
    so the host never holds more than `host` itself (and every process passes the same `host`)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: Any, shardings: Any) -> Any:
    """Every array of `tree` with its sharding: arrays already laid out so are kept as they are, others (host
    arrays, or arrays on one device) are placed slice by slice."""
    def one(a: Any, s: NamedSharding) -> jax.Array:
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(s, a.ndim):
            return a
        return place(np.asarray(a), s)

    return jax.tree.map(one, tree, shardings)


def process_rows(sharding: NamedSharding, shape: Sequence[int], axis: int) -> range:
    """The indices along `axis` of an array of `shape` that this process's devices hold (a contiguous run: the mesh
    puts a process's devices next to each other), i.e. the rows of a batch this process must supply."""
    spans = {(i[axis].start or 0, shape[axis] if i[axis].stop is None else i[axis].stop)
             for i in sharding.addressable_devices_indices_map(tuple(shape)).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise GemmatuneError(f"this process's devices hold rows {sorted(spans)} of the batch, not one contiguous "
                             "run; order the mesh so that each process's devices are adjacent on the data axes.")
    return range(lo, hi)


def to_host(tree: Any) -> Any:
    """Every array of a (possibly multi-process) tree as one that np.asarray can read on this process: gathered
    from the other processes when it is split across them. A collective: every process must call it."""
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(multihost_utils.process_allgather(jax.random.key_data(x), tiled=True),
                                            impl=impl)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)
