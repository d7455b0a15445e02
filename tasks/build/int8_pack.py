"""Rewrite integer conv2d / matmul layers into a GEMM that MetaSchedule can tensorize with the x86
int8 dot-product instructions (vpdpbusd on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2).

Why: `conv2d / matmul(x 8-bit, W int8 const, out_dtype=int32)` (tasks.precision.quantize, and the QDQ import)
lowers to plain loops of widened 32-bit multiplies, slower than fp32. The dot-product intrinsics
(tasks.build.int8_isa.DotIntrin: u8[4] x s8[L, 4] -> s32[L]) need the reduction in groups of 4 contiguous
bytes of the activation and the weight packed [O/L, K/4, L, 4]. So each such layer becomes
    A   = im2col(x) [M, K4]   uint8, M = N*OH*OW, K4 = C*KH*KW rounded up to a multiple of 4
    C   = A @ Wp    [M, O_L]  int32, Wp: the weight packed at compile time, O and K zero-padded
    out = C back to the layer's own NCHW / [..., O] int32 shape (minus the shift correction)
three Relax calls (emit_te): the GEMM alone in its kernel, its block named
int8_isa.PACKED_GEMM_BLOCK so tasks.tuning.tune gives it the tensorize space; the layout change and the
quantizer's float rescale fuse after it. A 1x1 stride-1 conv's "im2col" is just NCHW -> [M, C].
The result is bit-exact against the layer it replaces (tests/build/test_int8_pack.py).

Choices:
- int8 (signed) activations: the instructions want u8 activations, so A = x + 128 (u8) and the
  output subtracts 128 * sum_k W[o, k] (a per-channel int32 constant). Exact, costs one add in
  the im2col copy; padding is shifted too (0 -> 128), which the correction accounts for.
- AVX2 saturation: vpmaddubsw adds each pair of u8*s8 products in int16 with saturation. A layer
  is packed for AVX2 only when no weight pair can saturate for any u8 input (positive and negative
  parts of each pair sum to <= 128 in magnitude: 255 * 128 < 32768), checked on the constant.
  7-bit weights (QuantConfig.reduce_range, |w| <= 63) always pass; full 8-bit weights usually do
  not, and such layers keep their plain (exact, slow) lowering. VNNI has no such limit.
- Grouped / depthwise convs are left as they are (int8, plain lowering): per group the reduction
  is C/g*KH*KW (9 for a 3x3 depthwise), too short for 4-deep dot products to pay for an im2col
  copy, and as they are they are no slower than fp32. Measured (EfficientNet-Lite0's 3x3
  depthwise, 144 channels at 56x56, untuned + tasks.build.cpu_fallback, best of 3, load ~2-4):
  fp32 2.77 ms, int8 2.33 ms (quantize 0.16 + conv 2.17). Keeping them in float would buy no
  speed, so tasks.precision.quantize still quantizes them (the accuracy gate decides, --keep-float overrides).
- Only NCHW / OIHW convs (what the importers produce); other layouts are left as they are.
"""

from __future__ import annotations

import logging

import numpy as np

from tasks.build.int8_isa import IM2COL_BLOCK, PACKED_GEMM_BLOCK, DotIntrin, dot_intrin_for

log = logging.getLogger("tvmflow.int8_pack")
SHIFT = 128  # int8 -> uint8 activation offset
PAIR_LIMIT = 128  # 255 * 128 = 32640 fits int16; 255 * 129 does not


def pack_weight(w2d: np.ndarray, lanes: int) -> np.ndarray:
    """[O, K] int8 -> [ceil(O/lanes), ceil(K/4), lanes, 4], zero-padded."""
    o, k = w2d.shape
    o_pad, k_pad = -(-o // lanes) * lanes, -(-k // 4) * 4
    padded = np.zeros((o_pad, k_pad), "int8")
    padded[:o, :k] = w2d
    return np.ascontiguousarray(padded.reshape(o_pad // lanes, lanes, k_pad // 4, 4).transpose(0, 2, 1, 3))


def pairs_never_saturate(w2d: np.ndarray) -> bool:
    """True when vpmaddubsw's int16 pair sums cannot saturate for any u8 activations."""
    k_pad = -(-w2d.shape[1] // 2) * 2
    w = np.zeros((w2d.shape[0], k_pad), "int32")
    w[:, : w2d.shape[1]] = w2d
    pos, neg = np.maximum(w, 0), np.maximum(-w, 0)
    return bool(
        (pos[:, 0::2] + pos[:, 1::2]).max(initial=0) <= PAIR_LIMIT
        and (neg[:, 0::2] + neg[:, 1::2]).max(initial=0) <= PAIR_LIMIT
    )


def _packed_gemm(a, wp):
    """C[m, o] = sum_k A[m, k] * Wp[o / L, k / 4, o % L, k % 4]: the intrinsic's description, tiled."""
    from tvm import te

    m, k_pad = a.shape
    blocks, _, lanes, _ = wp.shape
    r = te.reduce_axis((0, k_pad), "k")
    return te.compute(
        (m, blocks * lanes),
        lambda i, j: te.sum(a[i, r].astype("int32") * wp[j // lanes, r // 4, j % lanes, r % 4].astype("int32"), axis=r),
        name=PACKED_GEMM_BLOCK,
    )


def _as_u8(value, shift: bool):
    return (value.astype("int32") + SHIFT).astype("uint8") if shift else value


def _im2col(x, kernel, strides, dilation, k_pad, shift):
    """x, already zero-padded [N, C, H, W] -> the GEMM's uint8 activation rows, a pure gather.

    K = C*KH*KW a multiple of 4 (every conv but a first one on 1 or 3 channels): a 6-D
    [N, OH, OW, C, KH, KW] tensor, i.e. [M, K] row-major, which _packed_layer views as [M, K] at no
    cost; its indices are affine in the loops. Otherwise [M, k_pad] directly, zeros past K.
    Measured for ResNet-18's 3x3 64->64 conv at 56x56 (GEMM: 1.3-1.7 ms tuned): the flat [M, K]
    form (four div/mod per element) with the padding as bounds checks and the quantize fused in,
    2.6 ms tuned; the 6-D form with bounds checks, 8-11 ms untuned; the 6-D pure gather from a
    padded input, 0.44 ms untuned."""
    from tvm import te

    n, c, h, w = (int(d) for d in x.shape)
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    k = c * kh * kw

    def tap(b, y_out, x_out, ci, i, j):
        return _as_u8(x[b, ci, y_out * sh + i * dh, x_out * sw + j * dw], shift)

    if k_pad == k:
        return te.compute((n, oh, ow, c, kh, kw), tap, name=IM2COL_BLOCK)

    def flat(m, kk):
        kc = te.min(kk, k - 1)
        rest = m % (oh * ow)
        value = tap(m // (oh * ow), rest // ow, rest % ow, kc // (kh * kw), kc % (kh * kw) // kw, kc % kw)
        return te.if_then_else(kk < k, value, te.const(0, "uint8"))

    return te.compute((n * oh * ow, k_pad), flat, name=IM2COL_BLOCK)


def _rows(x, k_pad, shift):
    """A matmul's activation as uint8 (+128 when signed), zeros past K: [M, k_pad] when K needs
    padding, else x's own shape (viewed as [M, K] by _packed_layer)."""
    from tvm import te

    k = int(x.shape[-1])
    if k_pad == k:
        return te.compute(x.shape, lambda *idx: _as_u8(x[idx], shift), name="rows")
    lead = [int(d) for d in x.shape[:-1]]
    m = int(np.prod(lead)) if lead else 1

    def element(i, kk):
        idx, rest = [], i
        for d in reversed(lead):
            idx.insert(0, rest % d)
            rest = rest // d
        value = _as_u8(x[(*idx, te.min(kk, k - 1))], shift)
        return te.if_then_else(kk < k, value, te.const(0, "uint8"))

    return te.compute((m, k_pad), element, name="rows")


def _unpack(c, out_shape, channel_axis: int, correction):
    """C[M, O_L] -> the layer's int32 output (O on `channel_axis`), minus the shift correction."""
    from tvm import te

    dims = [int(d) for d in out_shape]
    spatial = [d for i, d in enumerate(dims) if i != channel_axis]

    def element(*idx):
        o = idx[channel_axis]
        rest = [v for i, v in enumerate(idx) if i != channel_axis]
        m = 0
        for v, d in zip(rest, spatial):
            m = m * d + v
        value = c[m, o]
        return value - correction[o] if correction is not None else value

    return te.compute(dims, element, name="unpack")


def _weight_2d(call, kind: str) -> np.ndarray:
    w = call.args[1].value.numpy()
    return w.reshape(w.shape[0], -1) if kind == "conv2d" else w.T


def _is_int8_layer(call) -> bool:
    """conv2d / matmul (not linear: its weight is [N, K]) of 8-bit x into int32."""
    return (
        call.op.name in ("relax.nn.conv2d", "relax.matmul")
        and str(call.ty.dtype) == "int32"
        and str(call.args[0].ty.dtype) in ("uint8", "int8")
    )


def _why_not_packed(call, kind: str) -> str | None:
    """Why an int8 layer cannot be packed, or None."""
    import tvm

    x, w = call.args[0], call.args[1]
    if not isinstance(w, tvm.ir.Constant) or str(w.ty.dtype) != "int8":
        return "weight is not an int8 constant"
    try:
        [int(d) for d in x.ty.shape]
    except (TypeError, ValueError):
        return "dynamic shape"
    if kind == "conv2d":
        attrs = call.attrs
        if int(attrs.groups) != 1:
            return "grouped/depthwise conv"
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout)) != (
            "NCHW",
            "OIHW",
            "NCHW",
        ):
            return "layout is not NCHW/OIHW"
    elif len(w.ty.shape) != 2:
        return "batched weight"
    return None


def pack_int8_layers(mod, target):
    """The module with every packable 8-bit conv2d / matmul (int32 out, int8 constant weight) of
    `main` as im2col + packed GEMM for `target`'s dot-product intrinsic; unchanged when the target
    has none (ARM, GPUs) or the module has no such layer."""
    from tasks.precision.layers import make_rewriter

    intrin = dot_intrin_for(target)
    if intrin is None:
        return mod
    packed: list[str] = []

    def handler(bb, layer, call):
        if not _is_int8_layer(call):
            return None
        why = _why_not_packed(call, layer.kind)
        w2d = None if why else _weight_2d(call, layer.kind)
        if why is None and intrin.saturates and not pairs_never_saturate(w2d):
            why = f"int8 weight pairs may saturate {intrin.name} (use 7-bit weights: reduce_range)"
        if why:
            log.info("int8 layer %s not packed: %s", layer.name, why)
            return None
        packed.append(layer.name)
        return _packed_layer(bb, call, layer.kind, w2d, intrin)

    rewriter = make_rewriter(handler)(mod)
    func = rewriter.visit_expr(mod["main"])
    if not packed:
        return mod
    log.info("packed %d int8 layers for %s: %s", len(packed), intrin.name, ", ".join(packed))
    new = rewriter.builder_.get()  # the module plus the emitted TE kernels
    new["main"] = func
    return new


def _keep_unfused(bb, var) -> None:
    """Mark the kernel computing `var` opaque, so FuseOps fuses nothing into it. Fused, the
    quantize producing x (multiply, round, clip, cast) and the padding ran once per im2col
    element, KH*KW times per input element, unvectorized (kw, innermost, is 3 wide). Unfused,
    they join the previous layer's epilogue and im2col is a plain byte gather (see _im2col)."""
    gvar = bb.lookup_binding(var).args[0]
    bb.update_func(gvar, bb.get()[gvar].with_attr("op_pattern", 8))  # kOpaque


def _packed_layer(bb, call, kind: str, w2d: np.ndarray, intrin: DotIntrin):
    from tvm import relax

    x = call.args[0]
    shift = str(x.ty.dtype) == "int8"
    k_pad = -(-w2d.shape[1] // 4) * 4
    if kind == "conv2d":
        attrs = call.attrs
        kernel = list(call.args[1].value.numpy().shape[2:])
        top, left, bottom, right = (int(v) for v in attrs.padding)
        if top or left or bottom or right:  # zeros (before the +128 shift): fuses with the quantize
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=0.0))
        a = bb.emit_te(
            _im2col,
            x,
            kernel,
            [int(v) for v in attrs.strides],
            [int(v) for v in attrs.dilation],
            k_pad,
            shift,
            primfunc_name_hint="int8_im2col",
        )
        _keep_unfused(bb, a)
        channel_axis = 1
    elif shift or k_pad != w2d.shape[1]:
        a = bb.emit_te(_rows, x, k_pad, shift, primfunc_name_hint="int8_rows")
        channel_axis = len(call.ty.shape) - 1
    else:  # uint8 rows, K a multiple of 4: the GEMM reads x itself
        a, channel_axis = x, len(call.ty.shape) - 1
    shape = [int(d) for d in a.ty.shape]
    if len(shape) != 2:
        a = bb.emit(relax.op.memory.view(a, relax.ShapeExpr([int(np.prod(shape)) // k_pad, k_pad])))
    c = bb.emit_te(
        _packed_gemm, a, relax.const(pack_weight(w2d, intrin.lanes)), primfunc_name_hint=f"int8_gemm_{intrin.name}"
    )
    correction = relax.const((SHIFT * w2d.astype("int32").sum(axis=1)).astype("int32")) if shift else None
    return bb.emit_te(
        _unpack, c, [int(d) for d in call.ty.shape], channel_axis, correction, primfunc_name_hint="int8_unpack"
    )
