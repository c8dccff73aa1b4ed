"""Block-wise quantization of the frozen base's projection weights (QLoRA): NF4, int4 and int8, with optional
double quantization of the scales, stored as plain pytrees that the model dequantizes inside the compiled step.

A quantized weight replaces the array W of a projection with a dict of arrays. Its elements are kept as a matrix
in the order bitsandbytes (and a PyTorch nn.Linear) keeps them, [*outputs, inputs] with the input axes flattened
(layout.stored_order), so that a bitsandbytes checkpoint loads by reshaping alone and a block of `block`
consecutive elements lies along the input. With leading axes (the [L] layer stack) in front, and n the input
size:

    4-bit (nf4, int4)  "packed": uint8 [..., *out, n / 2]       two codes per byte, the first in the high nibble
                                                               (bitsandbytes' order)
                       "table":  float32 [..., 16]             the code book (NF4, or k/7 for int4)
    8-bit (int8)       "codes":  int8 [..., *out, n]           round(127 x / absmax)
    scales             "scale":  float32 [..., *out, n / block]   each block's absmax (int8: absmax / 127)
    double quant       "scale" is replaced by bitsandbytes' nested form: "scale_codes" uint8 (the shape of
                       scale), "scale_table" float32 [..., 256] (the signed dynamic map), "scale_absmax" float32
                       [..., ceil(m / 256)] (one per 256 consecutive scales, m of them) and "scale_offset"
                       float32 [...] (their mean, subtracted before coding).

Every leaf keeps the leading axes, so the layer scan slices a quantized weight like any other. Quantization
follows bitsandbytes' reference implementation step for step (x times the reciprocal of the block's absmax, clipped
to [-1, 1], the nearest code by comparison with the midpoints between codes, ties to the lower code), so NF4 codes
and scales equal `bitsandbytes.functional.quantize_4bit`'s (tests/test_quantize.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    """x [..., n] float32 -> (x as [..., n / block, block], each block's absmax [..., n / block])."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return xb, jnp.max(jnp.abs(xb), axis=-1)


def _scaled(xb: jax.Array, absmax: jax.Array) -> jax.Array:
    """Each block times the reciprocal of its absmax, clipped to [-1, 1] (an all-zero block stays zero)."""
    return jnp.clip(xb * (1.0 / jnp.maximum(absmax, 1e-38))[..., None], -1, 1)


def _matrix(w: jax.Array, name: str) -> jax.Array:
    """One weight in W's layout -> [*outputs, inputs] float32 (the stored order)."""
    w_out, w_in = stored_order(name)
    x = jnp.einsum(f"{weight_axes(name)[0]}->{w_out + w_in}", w.astype(jnp.float32))
    return x.reshape(*x.shape[:len(w_out)], -1)


def _quantize_one(w: jax.Array, name: str, q: Quantization) -> Params:
    """One weight in W's layout (no leading axes) -> its quantized fields."""
    x = _matrix(w, name)
    xb, absmax = _absmax_blocks(x, q.block)
    out: Params = {}
    if q.kind == "int8":
        # Symmetric: scale = absmax / 127; round half to even (jnp.round), as PyTorch's torch.round would.
        scale = absmax / 127.0
        out["codes"] = jnp.round(_scaled(xb, absmax) * 127.0).astype(jnp.int8).reshape(x.shape)
    else:
        table = TABLES[q.kind]
        codes = _nearest(_scaled(xb, absmax), table).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        out["packed"] = (codes[..., 0] << 4) | codes[..., 1]
        out["table"] = jnp.asarray(table)
        scale = absmax
    if q.double:
        out.update(_double(scale))
    else:
        out["scale"] = scale
    return out


def _double(scale: jax.Array) -> Params:
    """bitsandbytes' double quantization of a weight's scales: minus their mean, in blocks of 256 consecutive
    scales (row-major), each block's absmax kept in float32 and its values coded with the dynamic map."""
    flat = scale.reshape(-1)
    offset = jnp.mean(flat)
    n = flat.shape[0]
    pad = -n % NESTED_BLOCK
    centred = jnp.pad(flat - offset, (0, pad))
    xb, absmax = _absmax_blocks(centred, NESTED_BLOCK)
    # A short last block's padding is zeros: it cannot raise that block's absmax.
    codes = _nearest(_scaled(xb, absmax), dynamic_map()).reshape(-1)[:n]
    return {"scale_codes": codes.reshape(scale.shape), "scale_table": jnp.asarray(dynamic_map()),
            "scale_absmax": absmax, "scale_offset": offset}


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
    """The float32 scales of one weight (no leading axes): stored, or decoded from double quantization
    (table[code] * the nested block's absmax + offset, in float32, as bitsandbytes does)."""
    if "scale" in qw:
        return qw["scale"]
    codes = qw["scale_codes"]
    flat = qw["scale_table"][codes.reshape(-1).astype(jnp.int32)]
    nested = qw["scale_absmax"][jnp.arange(flat.shape[0]) // NESTED_BLOCK]  # each scale's nested block's absmax
    product = flat * nested
    # bitsandbytes rounds the product, then adds the offset. Compiled, XLA contracts the two into one fused
    # multiply-add (one rounding: 1 ulp off on some scales); a select between them (an identity, NaN included)
    # keeps them apart.
    product = jnp.where(product == product, product, jnp.nan)
    return (product + qw["scale_offset"]).reshape(codes.shape)


def _matrix_one(qw: Params, dtype: Any) -> jax.Array:
    scale = scales(qw)  # [*out, n / block]
    if "codes" in qw:
        values = qw["codes"].astype(jnp.float32)  # [*out, n]
    else:
        p = qw["packed"]
        codes = jnp.stack([p >> 4, p & 15], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
        values = qw["table"][codes.astype(jnp.int32)]
    blocks = values.reshape(*scale.shape, -1) * scale[..., None]  # float32, as bitsandbytes multiplies
    return blocks.reshape(values.shape).astype(dtype)


def matrix(qw: Params, name: str, dtype: Any = jnp.float32) -> jax.Array:
    """The dequantized weight as stored, [..., *outputs, inputs], in `dtype`: computed in float32, then cast
    (bitsandbytes' dequantize_4bit, to the bit)."""
    f = functools.partial(_matrix_one, dtype=dtype)
    scale = qw["scale_codes"] if "scale_codes" in qw else qw["scale"]
    for _ in range(scale.ndim - len(stored_order(name)[0]) - 1):  # leading axes
        f = jax.vmap(f)
    return f(qw)


def dequantize(qw: Params, name: str, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The weight in W's layout of `shape` (leading axes, then W's), in `dtype`."""
    w = weight_axes(name)[0]
    w_out, w_in = stored_order(name)
    dims = dict(zip(w, shape[len(shape) - len(w):]))
    m = matrix(qw, name, dtype)
    m = m.reshape(*m.shape[:m.ndim - 1], *(dims[c] for c in w_in))
    return jnp.einsum(f"...{w_out + w_in}->...{w}", m)


def project(name: str, x: jax.Array, qw: Params) -> jax.Array:
    """x through a quantized projection, y = x W with W dequantized block-wise into x's dtype inside the compiled
    step (XLA fuses it into the matrix product's operand). Under `jax.checkpoint` the backward pass recomputes
    the dequantized weight instead of keeping it as a residual: otherwise differentiating through the layer scan
    would store every layer's dequantized weight, a full-precision copy of the model."""
    w_out, w_in = stored_order(name)
    n_in = len(w_in)

    def f(x: jax.Array, qw: Params) -> jax.Array:
        xf = x.reshape(*x.shape[:x.ndim - n_in], -1)  # [..., inputs]
        return jnp.einsum(f"...i,{w_out}i->...{w_out}", xf, matrix(qw, name, x.dtype))

    return jax.checkpoint(f)(x, qw)


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
