"""Block-wise quantization of the frozen base's projection weights (QLoRA): NF4, int4 and int8, with optional
double quantization of the scales, stored as plain pytrees that the model dequantizes inside the compiled step.

A quantized weight replaces the array W of a projection with a dict of arrays. Its elements keep W's order with
the input axes flattened, [inputs, *outputs] (layout.stored_order), and a block of `block` consecutive elements
runs along the input. With leading axes (the [L] layer stack) in front, n the input size and nb = n / block:

    4-bit (nf4, int4)  "packed": uint32 [..., n / 8, *out]     the codes of 8 consecutive inputs per word, in
                                                               bitsandbytes' byte order (two per byte, the first
                                                               in the high nibble) read as a little-endian word
                       "table":  float32 [..., 16]             the code book (NF4, or k/7 for int4)
    8-bit (int8)       "codes":  int8 [..., n, *out]           round(127 x / absmax)
    scales             "scale":  float32 [..., nb, *out]       each block's absmax (int8: absmax / 127)
    double quant       "scale" is replaced by bitsandbytes' nested form: "scale_codes" uint8 (the shape of
                       scale), "scale_table" float32 [..., 256] (the signed dynamic map), "scale_absmax" float32
                       [..., ceil(m / 256)] (one per 256 scales, m of them, consecutive in bitsandbytes' [out, nb]
                       order) and "scale_offset" float32 [...] (their mean, subtracted before coding).

bitsandbytes stores the transpose, [out, in] (a PyTorch weight's order): from_bnb and to_bnb convert, losslessly.
Every leaf keeps the leading axes, so the layer scan slices a quantized weight like any other. Quantization
follows bitsandbytes' reference implementation step for step (x times the reciprocal of the block's absmax, clipped
to [-1, 1], the nearest code by comparison with the midpoints between codes, ties to the lower code), so NF4 codes
and scales equal `bitsandbytes.functional.quantize_4bit`'s (tests/test_quantize.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from gemmatune import sharding
from gemmatune.config import ModelConfig, Quantization
from gemmatune.layout import NESTED_BLOCK, Params, check_block, param_shapes, stored_order, weight_axes

# NormalFloat-4 (QLoRA paper, appendix E): the quantiles of N(0, 1) scaled to [-1, 1], with an exact zero. These
# are the float32 values bitsandbytes stores as quant_map.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
# Symmetric int4 as a code book: nibble n (two's complement) means n / 7; -8 is never produced (|x| <= absmax).
INT4 = (np.array([n - 16 if n >= 8 else n for n in range(16)], dtype=np.float64) / 7).astype(np.float32)
TABLES = {"nf4": NF4, "int4": INT4}
# Where the 4-bit code of each of a word's 8 consecutive elements sits: bitsandbytes' bytes (high nibble first)
# read as a little-endian word. Words rather than bytes because XLA's TPU compiler tiles uint8 arrays differently
# for arithmetic than for storage, and copied whole stacks of packed bytes before the layer scan.
WORD_SHIFTS = np.array([4, 0, 12, 8, 20, 16, 28, 24], np.uint32)


def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map (Dettmers, 8-bit approximations, 2015) that double quantization codes the
    scales with, float32 [256], ascending: for exponents 10^-6 .. 10^0, the midpoints of an evenly spaced grid on
    [0.1, 1] whose size doubles with the exponent, both signs; then 0 and 1. bitsandbytes builds the same values
    (its nested quant_map); a checkpoint's own map is checked against this one on import."""
    values: list[float] = []
    for i in range(7):
        grid = _linspace32(2 ** i + 1)
        mids = (grid[:-1] + grid[1:]) / np.float32(2)
        power = np.float32(10.0 ** (i - 6))  # float32 products, as PyTorch multiplies a float32 tensor
        values += list(power * mids) + list(-power * mids)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return np.sort(np.array(values, dtype=np.float32))


def _linspace32(steps: int) -> np.ndarray:
    """steps points from 0.1 to 1 as PyTorch's float32 linspace computes them (a float32 step; the first half
    counted up from the start, the second half down from the end, each point one fused multiply-add), so the
    map matches bitsandbytes' to the bit."""
    start, end = np.float32(0.1), np.float32(1.0)
    step = np.float64((end - start) / np.float32(steps - 1))
    i = np.arange(steps)
    up = (np.float64(start) + step * i).astype(np.float32)
    down = (np.float64(end) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, up, down)


def is_quantized(x: Any) -> bool:
    """A quantized weight (the dict this module builds) rather than an array."""
    return isinstance(x, Mapping) and ("packed" in x or "codes" in x)


# --- quantizing --------------------------------------------------------------------------------------------------

def _nearest(scaled: jax.Array, table: np.ndarray) -> jax.Array:
    """Index into `table` of the code nearest each value, ties to the lower code (bitsandbytes' bucketize over
    the midpoints of the sorted codes, then back to the table's order)."""
    order = np.argsort(table, kind="stable")
    mids = (table[order[:-1]] + table[order[1:]]) / np.float32(2)
    rank = jnp.sum(scaled[..., None] > jnp.asarray(mids), axis=-1)
    return jnp.asarray(order.astype(np.uint8))[rank]


def _absmax_blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """x [n, ...] float32 -> (x as [n / block, block, ...], each block's absmax [n / block, ...])."""
    xb = x.reshape(x.shape[0] // block, block, *x.shape[1:])
    return xb, jnp.max(jnp.abs(xb), axis=1)


def _scaled(xb: jax.Array, absmax: jax.Array) -> jax.Array:
    """Each block times the reciprocal of its absmax, clipped to [-1, 1] (an all-zero block stays zero)."""
    return jnp.clip(xb * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1)


def _quantize_one(w: jax.Array, name: str, q: Quantization) -> Params:
    """One weight in W's layout (no leading axes) -> its quantized fields."""
    x = w.astype(jnp.float32).reshape(-1, *w.shape[len(stored_order(name)[1]):])  # [n, *out]
    xb, absmax = _absmax_blocks(x, q.block)
    out: Params = {}
    if q.kind == "int8":
        # Symmetric: scale = absmax / 127; round half to even (jnp.round), as PyTorch's torch.round would.
        scale = absmax / 127.0
        out["codes"] = jnp.round(_scaled(xb, absmax) * 127.0).astype(jnp.int8).reshape(x.shape)
    else:
        table = TABLES[q.kind]
        codes = _nearest(_scaled(xb, absmax), table).reshape(-1, 8, *x.shape[1:]).astype(jnp.uint32)
        shifts = jnp.asarray(WORD_SHIFTS).reshape(8, *(1,) * (x.ndim - 1))
        out["packed"] = jnp.sum(codes << shifts, axis=1, dtype=jnp.uint32)  # disjoint bits: the sum is an or
        out["table"] = jnp.asarray(table)
        scale = absmax
    if q.double:
        out.update(_double(scale))
    else:
        out["scale"] = scale
    return out


def _double(scale: jax.Array) -> Params:
    """bitsandbytes' double quantization of a weight's scales [nb, *out]: minus their mean, in blocks of 256
    consecutive scales of its [out, nb] order, each block's absmax kept in float32 and its values coded with the
    dynamic map."""
    flat = jnp.moveaxis(scale, 0, -1).reshape(-1)  # bitsandbytes' order
    offset = jnp.mean(flat)
    n = flat.shape[0]
    pad = -n % NESTED_BLOCK
    centred = jnp.pad(flat - offset, (0, pad))
    xb, absmax = _absmax_blocks(centred, NESTED_BLOCK)
    # A short last block's padding is zeros: it cannot raise that block's absmax.
    codes = _nearest(_scaled(xb, absmax), dynamic_map()).reshape(-1)[:n]
    codes = jnp.moveaxis(codes.reshape(*scale.shape[1:], scale.shape[0]), -1, 0)
    return {"scale_codes": codes, "scale_table": jnp.asarray(dynamic_map()), "scale_absmax": absmax,
            "scale_offset": offset}


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize(w: jax.Array, name: str, q: Quantization) -> Params:
    """A projection weight (any leading axes, then W's layout) -> its quantized fields (see the module
    docstring). Compiled once per shape; run it on each tensor as the checkpoint streams in."""
    check_block(name, w.shape, q)
    f = functools.partial(_quantize_one, name=name, q=q)
    for _ in range(w.ndim - len(weight_axes(name)[0])):
        f = jax.vmap(f)
    return f(w)


# --- dequantizing ------------------------------------------------------------------------------------------------

def scales(qw: Params) -> jax.Array:
    """The float32 scales [nb, *out] of one weight (no leading axes): stored, or decoded from double quantization
    (table[code] * the nested block's absmax + offset, in float32, as bitsandbytes does)."""
    if "scale" in qw:
        return qw["scale"]
    codes = qw["scale_codes"]  # [nb, *out]
    nb, rows = codes.shape[0], math.prod(codes.shape[1:])
    order = jnp.arange(rows).reshape(1, *codes.shape[1:]) * nb + jnp.arange(nb).reshape(nb, *(1,) * (codes.ndim - 1))
    nested = qw["scale_absmax"][order // NESTED_BLOCK]  # each scale's nested block (bitsandbytes' order)
    product = qw["scale_table"][codes.astype(jnp.int32)] * nested
    # bitsandbytes rounds the product, then adds the offset. Compiled, XLA contracts the two into one fused
    # multiply-add (one rounding: 1 ulp off on some scales); a select between them (an identity, NaN included)
    # keeps them apart.
    product = jnp.where(product == product, product, jnp.nan)
    return product + qw["scale_offset"]


def _matrix_one(qw: Params, dtype: Any, scale: jax.Array | None = None) -> jax.Array:
    """One weight (no leading axes) dequantized, [n, *out] in `dtype`; `scale`: its decoded scales, if at hand."""
    # Elementwise from the stored words to the output (no gather, no interleaving of nibbles), so the compiler can
    # fuse the whole dequantization into one pass: a table gather and a stack of the two nibbles made XLA
    # materialize int32 codes and float32 values of a whole weight (1.3 GiB per gemma2-27b MLP projection).
    scale = scales(qw) if scale is None else scale  # [nb, *out]
    nb, out = scale.shape[0], scale.shape[1:]
    if "codes" in qw:
        values = qw["codes"].reshape(nb, -1, *out).astype(jnp.float32)  # [nb, block, *out]
    else:
        words = qw["packed"].reshape(nb, -1, 1, *out)  # [nb, block / 8, 1, *out]
        codes = (words >> jnp.asarray(WORD_SHIFTS).reshape(8, *(1,) * len(out))) & 15  # [nb, block / 8, 8, *out]
        values = _lookup(qw["table"], codes).reshape(nb, -1, *out)  # [nb, block, *out]
    blocks = values * scale[:, None]  # float32, as bitsandbytes multiplies
    return blocks.reshape(-1, *out).astype(dtype)  # [n, *out]


def _lookup(table: jax.Array, codes: jax.Array) -> jax.Array:
    """table[codes] for a 16-entry table and 4-bit codes, as a tree of selects on the codes' bits: elementwise,
    so it fuses where a gather would not."""
    values = [table[i] for i in range(16)]
    for bit in range(4):
        on = (codes >> bit) & 1 == 1
        values = [jnp.where(on, hi, lo) for lo, hi in zip(values[0::2], values[1::2])]
    return values[0]


def matrix(qw: Params, name: str, dtype: Any = jnp.float32) -> jax.Array:
    """The dequantized weight as stored, [..., inputs, *outputs], in `dtype`: computed in float32, then cast
    (bitsandbytes' dequantize_4bit, to the bit)."""
    f = functools.partial(_matrix_one, dtype=dtype)
    scale = qw["scale_codes"] if "scale_codes" in qw else qw["scale"]
    for _ in range(scale.ndim - len(stored_order(name)[0]) - 1):  # leading axes
        f = jax.vmap(f)
    return f(qw)


def dequantize(qw: Params, name: str, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The weight of `shape` (leading axes, then W's layout), in `dtype`."""
    return matrix(qw, name, dtype).reshape(shape)


# The most elements of a weight `project` dequantizes at once on one device: a larger weight is multiplied a slice of
# whole blocks (along its input) at a time, so the dequantization's temporaries stay near this size whatever the
# compiler fuses (unsliced, XLA's TPU compiler kept 0.9 GiB of them for one gemma3-27b down_proj in the backward
# pass). On a mesh the weight is split over the devices instead: slicing an input split over the model axis would
# make every layer exchange its codes between devices.
SLICE_ELEMENTS = 2**24
PRODUCT = "quantized_product"  # the checkpoint name of a quantized projection's output


def _slices(nb: int, size: int) -> int:
    """Into how many slices of whole blocks `project` cuts a weight of `size` elements in `nb` blocks per output:
    the fewest that divide nb and keep a slice within SLICE_ELEMENTS."""
    return next((k for k in range(1, nb + 1) if nb % k == 0 and size // k <= SLICE_ELEMENTS), nb)


def project(name: str, x: jax.Array, qw: Params) -> jax.Array:
    """x through a quantized projection, y = x W with W dequantized block-wise into x's dtype inside the compiled
    step, a slice of its input at a time for large weights (the slices' products summed in float32). Under
    `jax.checkpoint` the backward pass recomputes the dequantized weight instead of keeping it as a residual:
    otherwise differentiating through the layer scan would store every layer's dequantized weight, a
    full-precision copy of the model."""
    w_out, w_in = stored_order(name)
    spec = f"...i,i{w_out}->...{w_out}"

    def f(x: jax.Array, qw: Params) -> jax.Array:
        xf = x.reshape(*x.shape[:x.ndim - len(w_in)], -1)  # [..., n]
        scale = scales(qw)  # [nb, *out]
        nb, out = scale.shape[0], scale.shape[1:]
        k = 1 if sharding.active_mesh() else _slices(nb, xf.shape[-1] * math.prod(out))
        if k == 1:
            return jnp.einsum(spec, xf, _matrix_one(qw, x.dtype, scale))
        stored = "codes" if "codes" in qw else "packed"
        table = {"table": qw["table"]} if "table" in qw else {}
        parts = (jnp.moveaxis(xf.reshape(*xf.shape[:-1], k, -1), -2, 0),  # [k, ..., n / k]
                 qw[stored].reshape(k, -1, *out), scale.reshape(k, nb // k, *out))

        def part(y: jax.Array, p: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
            xi, codes, si = p
            w = _matrix_one({**table, stored: codes}, x.dtype, si)  # [n / k, *out]
            return y + jnp.einsum(spec, xi, w, preferred_element_type=jnp.float32), None

        # Checkpointed too, or the scan keeps each slice's dequantized weight for its backward pass.
        y, _ = jax.lax.scan(jax.checkpoint(part), jnp.zeros((*xf.shape[:-1], *out), jnp.float32), parts)
        return y.astype(x.dtype)

    # Named, so that remat "block" keeps a sliced product (a scan's output, not a dot) like any other.
    return checkpoint_name(jax.checkpoint(f)(x, qw), PRODUCT)


# --- bitsandbytes' order ---------------------------------------------------------------------------------------

def from_bnb(packed: np.ndarray, scale: np.ndarray, out: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A bitsandbytes 4-bit weight's packed bytes (uint8, its [out, in] matrix row-major, two codes per byte) and
    absmax (float32, or uint8 codes when double-quantized; [out, nb] row-major) -> "packed" and "scale" (or
    "scale_codes") in gemmatune's order, bit for bit (to_bnb is the inverse)."""
    rows = math.prod(out)
    b = packed.reshape(rows, -1, 4).astype(np.uint32)  # [out, n / 8, 4]
    words = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return {"packed": words.T.reshape(-1, *out), "scale": scale.reshape(rows, -1).T.reshape(-1, *out)}


def to_bnb(qw: Params) -> dict[str, np.ndarray]:
    """One quantized weight's (no leading axes) packed codes and scales (or scale codes) in bitsandbytes' flat
    order: {"packed": uint8 [out * n / 2], "scale": [out * nb]}."""
    def rows_first(a: Any) -> np.ndarray:
        a = np.asarray(a)
        return a.reshape(a.shape[0], -1).T  # [out, m]

    words = rows_first(qw["packed"])[..., None] >> np.array([0, 8, 16, 24], np.uint32)
    return {"packed": (words & 255).astype(np.uint8).reshape(-1),
            "scale": rows_first(qw["scale_codes"] if "scale_codes" in qw else qw["scale"]).reshape(-1)}


def dequantize_tree(params: Params, cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """A parameter tree (stacked, or the per-layer list) with every quantized projection replaced by its
    dequantized weight in `dtype`: what the quantized model computes with, so merging an adapter into it gives
    the model that was trained."""
    shapes = param_shapes(cfg)["layers"]
    layers = params["layers"]

    def one(layer: Params, stacked: bool) -> Params:
        return {k: dequantize(v, k, shapes[k] if stacked else shapes[k][1:], dtype) if is_quantized(v) else v
                for k, v in layer.items()}

    return {**params, "layers": [one(la, False) for la in layers] if isinstance(layers, list) else one(layers, True)}
