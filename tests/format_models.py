"""Small real models in each source format, with fixed random weights, for the format tests.

No TensorFlow is installed (and none is needed at run time), so TFLite models are written
directly as TFLite flatbuffers with the `tflite` package's generated builders, the same
layout the TFLite converter emits: NHWC activations, OHWI conv weights, and for fp16 models
FLOAT16 weight buffers followed by DEQUANTIZE ops (what `optimizations=[DEFAULT]` +
`supported_types=[float16]` produces). The LiteRT interpreter runs them, so they are valid.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import numpy as np

TFLITE_INPUT = (1, 16, 16, 3)


# ---------------------------------------------------------------- TFLite
def _tfl(name: str):
    """A generated tflite schema module (the package's attributes are the classes)."""
    return importlib.import_module(f"tflite.{name}")


class _TFLiteWriter:
    def __init__(self):
        import flatbuffers

        self.b = flatbuffers.Builder(4096)
        self.buffers = [b""]  # buffer 0: the empty sentinel every TFLite file has
        self.tensors = []  # (name, shape, type, buffer index)
        self.ops = []  # (opcode, inputs, outputs, options type, options builder fn)
        self.opcodes: list[int] = []

    def tensor(self, name, shape, data: np.ndarray | None = None) -> int:
        from tflite.TensorType import TensorType

        ttype = TensorType.FLOAT32
        buf = 0
        if data is not None:
            ttype = TensorType.FLOAT16 if data.dtype == np.float16 else TensorType.FLOAT32
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buf = len(self.buffers) - 1
        self.tensors.append((name, tuple(shape), ttype, buf))
        return len(self.tensors) - 1

    def weight(self, name, value: np.ndarray, fp16: bool) -> int:
        """A float32 weight tensor; in an fp16 model, stored as FLOAT16 and DEQUANTIZEd."""
        from tflite.BuiltinOperator import BuiltinOperator

        if not fp16:
            return self.tensor(name, value.shape, value.astype(np.float32))
        half = self.tensor(name + "_fp16", value.shape, value.astype(np.float16))
        out = self.tensor(name, value.shape)
        self.op(BuiltinOperator.DEQUANTIZE, [half], [out])
        return out

    def op(self, code, inputs, outputs, opt_type=0, opt_fn=None):
        if code not in self.opcodes:
            self.opcodes.append(code)
        self.ops.append((self.opcodes.index(code), inputs, outputs, opt_type, opt_fn))

    def _ivec(self, start, values):
        start(self.b, len(values))
        for v in reversed(values):
            self.b.PrependInt32(v)
        return self.b.EndVector()

    def _bytes(self, data: bytes):
        b = self.b
        b.StartVector(1, len(data), 16)  # 16-byte aligned, as TFLite expects for buffers
        b.head = b.head - len(data)
        b.Bytes[b.head : b.head + len(data)] = data
        return b.EndVector()

    def finish(self, inputs, outputs) -> bytes:
        Buffer, Model, Operator, OperatorCode, SubGraph, Tensor = map(
            _tfl, ("Buffer", "Model", "Operator", "OperatorCode", "SubGraph", "Tensor")
        )
        b = self.b
        buf_offs = []
        for data in self.buffers:
            vec = self._bytes(data) if data else None
            Buffer.BufferStart(b)
            if vec is not None:
                Buffer.BufferAddData(b, vec)
            buf_offs.append(Buffer.BufferEnd(b))
        ten_offs = []
        for name, shape, ttype, buf in self.tensors:
            name_off, shape_off = b.CreateString(name), self._ivec(_tfl("Tensor").TensorStartShapeVector, list(shape))
            Tensor.TensorStart(b)
            Tensor.TensorAddShape(b, shape_off)
            Tensor.TensorAddType(b, ttype)
            Tensor.TensorAddBuffer(b, buf)
            Tensor.TensorAddName(b, name_off)
            ten_offs.append(Tensor.TensorEnd(b))
        op_offs = []
        for index, ins, outs, opt_type, opt_fn in self.ops:
            opts = opt_fn(b) if opt_fn else None
            in_off = self._ivec(Operator.OperatorStartInputsVector, ins)
            out_off = self._ivec(Operator.OperatorStartOutputsVector, outs)
            Operator.OperatorStart(b)
            Operator.OperatorAddOpcodeIndex(b, index)
            Operator.OperatorAddInputs(b, in_off)
            Operator.OperatorAddOutputs(b, out_off)
            if opts is not None:
                Operator.OperatorAddBuiltinOptionsType(b, opt_type)
                Operator.OperatorAddBuiltinOptions(b, opts)
            op_offs.append(Operator.OperatorEnd(b))

        def vec(start, offs):
            start(b, len(offs))
            for off in reversed(offs):
                b.PrependUOffsetTRelative(off)
            return b.EndVector()

        tensors_v = vec(SubGraph.SubGraphStartTensorsVector, ten_offs)
        ops_v = vec(SubGraph.SubGraphStartOperatorsVector, op_offs)
        in_v = self._ivec(SubGraph.SubGraphStartInputsVector, inputs)
        out_v = self._ivec(SubGraph.SubGraphStartOutputsVector, outputs)
        sg_name = b.CreateString("main")
        SubGraph.SubGraphStart(b)
        SubGraph.SubGraphAddTensors(b, tensors_v)
        SubGraph.SubGraphAddInputs(b, in_v)
        SubGraph.SubGraphAddOutputs(b, out_v)
        SubGraph.SubGraphAddOperators(b, ops_v)
        SubGraph.SubGraphAddName(b, sg_name)
        subgraph = SubGraph.SubGraphEnd(b)
        code_offs = []
        for code in self.opcodes:
            OperatorCode.OperatorCodeStart(b)
            OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            OperatorCode.OperatorCodeAddBuiltinCode(b, code)
            OperatorCode.OperatorCodeAddVersion(b, 1)
            code_offs.append(OperatorCode.OperatorCodeEnd(b))
        codes_v = vec(Model.ModelStartOperatorCodesVector, code_offs)
        subgraphs_v = vec(Model.ModelStartSubgraphsVector, [subgraph])
        buffers_v = vec(Model.ModelStartBuffersVector, buf_offs)
        desc = b.CreateString("tvmflow test model")
        Model.ModelStart(b)
        Model.ModelAddVersion(b, 3)
        Model.ModelAddOperatorCodes(b, codes_v)
        Model.ModelAddSubgraphs(b, subgraphs_v)
        Model.ModelAddDescription(b, desc)
        Model.ModelAddBuffers(b, buffers_v)
        b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def tflite_cnn(path: Path, fp16: bool = False, seed: int = 0) -> Path:
    """conv3x3+relu -> depthwise3x3+relu6 -> maxpool2 -> reshape -> dense(10) -> softmax, NHWC."""
    C, D, F, P, R, S = map(
        _tfl,
        (
            "Conv2DOptions",
            "DepthwiseConv2DOptions",
            "FullyConnectedOptions",
            "Pool2DOptions",
            "ReshapeOptions",
            "SoftmaxOptions",
        ),
    )
    from tflite.ActivationFunctionType import ActivationFunctionType as Act
    from tflite.BuiltinOperator import BuiltinOperator as Op
    from tflite.BuiltinOptions import BuiltinOptions as Opt
    from tflite.Padding import Padding

    rng = np.random.default_rng(seed)
    w = _TFLiteWriter()
    x = w.tensor("image", TFLITE_INPUT)
    conv_w = w.weight("conv/w", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), fp16)
    conv_b = w.weight("conv/b", rng.normal(0, 0.1, (8,)).astype(np.float32), fp16)
    dw_w = w.weight("dw/w", rng.normal(0, 0.3, (1, 3, 3, 8)).astype(np.float32), fp16)
    dw_b = w.weight("dw/b", rng.normal(0, 0.1, (8,)).astype(np.float32), fp16)
    fc_w = w.weight("fc/w", rng.normal(0, 0.1, (10, 8 * 8 * 8)).astype(np.float32), fp16)
    fc_b = w.weight("fc/b", rng.normal(0, 0.1, (10,)).astype(np.float32), fp16)
    t1, t2, t3 = w.tensor("conv", (1, 16, 16, 8)), w.tensor("dw", (1, 16, 16, 8)), w.tensor("pool", (1, 8, 8, 8))
    shape = w.tensor("flat/shape", (2,), np.array([1, 512], np.int32))
    t4, t5, out = w.tensor("flat", (1, 512)), w.tensor("logits", (1, 10)), w.tensor("probs", (1, 10))
    # int32 shape tensor: fix its type (tensor() infers float types only)
    name, shp, _, buf = w.tensors[shape]
    w.tensors[shape] = (name, shp, 2, buf)  # TensorType.INT32 == 2

    def conv_opts(b):
        C.Conv2DOptionsStart(b)
        C.Conv2DOptionsAddPadding(b, Padding.SAME)
        C.Conv2DOptionsAddStrideW(b, 1)
        C.Conv2DOptionsAddStrideH(b, 1)
        C.Conv2DOptionsAddFusedActivationFunction(b, Act.RELU)
        C.Conv2DOptionsAddDilationWFactor(b, 1)
        C.Conv2DOptionsAddDilationHFactor(b, 1)
        return C.Conv2DOptionsEnd(b)

    def dw_opts(b):
        D.DepthwiseConv2DOptionsStart(b)
        D.DepthwiseConv2DOptionsAddPadding(b, Padding.SAME)
        D.DepthwiseConv2DOptionsAddStrideW(b, 1)
        D.DepthwiseConv2DOptionsAddStrideH(b, 1)
        D.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
        D.DepthwiseConv2DOptionsAddFusedActivationFunction(b, Act.RELU6)
        D.DepthwiseConv2DOptionsAddDilationWFactor(b, 1)
        D.DepthwiseConv2DOptionsAddDilationHFactor(b, 1)
        return D.DepthwiseConv2DOptionsEnd(b)

    def pool_opts(b):
        P.Pool2DOptionsStart(b)
        P.Pool2DOptionsAddPadding(b, Padding.VALID)
        P.Pool2DOptionsAddStrideW(b, 2)
        P.Pool2DOptionsAddStrideH(b, 2)
        P.Pool2DOptionsAddFilterWidth(b, 2)
        P.Pool2DOptionsAddFilterHeight(b, 2)
        P.Pool2DOptionsAddFusedActivationFunction(b, Act.NONE)
        return P.Pool2DOptionsEnd(b)

    def reshape_opts(b):
        R.ReshapeOptionsStartNewShapeVector(b, 2)
        b.PrependInt32(512)
        b.PrependInt32(1)
        vec = b.EndVector()
        R.ReshapeOptionsStart(b)
        R.ReshapeOptionsAddNewShape(b, vec)
        return R.ReshapeOptionsEnd(b)

    def fc_opts(b):
        F.FullyConnectedOptionsStart(b)
        F.FullyConnectedOptionsAddFusedActivationFunction(b, Act.NONE)
        return F.FullyConnectedOptionsEnd(b)

    def softmax_opts(b):
        S.SoftmaxOptionsStart(b)
        S.SoftmaxOptionsAddBeta(b, 1.0)
        return S.SoftmaxOptionsEnd(b)

    w.op(Op.CONV_2D, [x, conv_w, conv_b], [t1], Opt.Conv2DOptions, conv_opts)
    w.op(Op.DEPTHWISE_CONV_2D, [t1, dw_w, dw_b], [t2], Opt.DepthwiseConv2DOptions, dw_opts)
    w.op(Op.MAX_POOL_2D, [t2], [t3], Opt.Pool2DOptions, pool_opts)
    w.op(Op.RESHAPE, [t3, shape], [t4], Opt.ReshapeOptions, reshape_opts)
    w.op(Op.FULLY_CONNECTED, [t4, fc_w, fc_b], [t5], Opt.FullyConnectedOptions, fc_opts)
    w.op(Op.SOFTMAX, [t5], [out], Opt.SoftmaxOptions, softmax_opts)
    path = Path(path)
    path.write_bytes(w.finish([x], [out]))
    return path


# ---------------------------------------------------------------- Keras
KERAS_INPUT = (1, 32, 32, 3)


def keras_mobilenet_like(seed: int = 0):
    """A MobileNetV2-style block stack (conv, BN, ReLU6, inverted residual, depthwise), NHWC."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input(KERAS_INPUT[1:], batch_size=1, name="image")
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    y = layers.Conv2D(16, 1, use_bias=False, name="expand")(x)
    y = layers.BatchNormalization(name="expand_bn")(y)
    y = layers.ReLU(6.0, name="expand_relu")(y)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.ReLU(6.0, name="dw_relu")(y)
    y = layers.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = layers.BatchNormalization(name="project_bn")(y)
    x = layers.Add(name="residual")([x, y])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(10, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="mobilenet_like")
    # non-trivial BN statistics, as a trained model has
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.1, beta.shape).astype("float32"),
                    rng.normal(0, 0.1, mean.shape).astype("float32"),
                    rng.uniform(0.5, 1.5, var.shape).astype("float32"),
                ]
            )
    return model


def save_keras_variants(model, out_dir: Path) -> dict[str, str]:
    """The model as a Keras 3 .keras file, a legacy full .h5, and architecture json + weights
    (Keras 2 style `save_weights('w.h5')` as MobileNetV2 alpha=0.5 deployments ship, and the
    Keras 3 `.weights.h5` layout). Returns {variant: --model URI}."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "full.keras")
    model.save(out_dir / "full.h5")
    (out_dir / "arch.json").write_text(model.to_json())
    with h5py.File(out_dir / "legacy_weights.h5", "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    model.save_weights(out_dir / "k3.weights.h5")
    return {
        "keras": str(out_dir / "full.keras"),
        "h5": str(out_dir / "full.h5"),
        "json+legacy_h5": f"{out_dir / 'arch.json'}+{out_dir / 'legacy_weights.h5'}",
        "json+weights_h5": f"{out_dir / 'arch.json'}+{out_dir / 'k3.weights.h5'}",
    }


# ---------------------------------------------------------------- MXNet (in its converter env)
MXNET_INPUT = (1, 1, 28, 28)
_MXNET_SCRIPT = """
import sys
import numpy as np
for name, value in {"bool": bool, "int": int, "float": float, "object": object, "str": str}.items():
    if name not in np.__dict__:
        setattr(np, name, value)
import mxnet as mx
from mxnet.gluon import nn
mx.random.seed(0)
net = nn.HybridSequential()
net.add(nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"), nn.MaxPool2D(2),
        nn.Conv2D(16, 3, padding=1, activation="relu"), nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(10))
net.initialize(mx.init.Xavier())
net.hybridize()
net(mx.nd.random.uniform(shape=(1, 1, 28, 28)))
net.export(sys.argv[1], epoch=int(sys.argv[2]))
"""


def mxnet_gluon_cnn(prefix: Path, epoch: int = 3) -> Path:
    """Export a small Gluon CNN as <prefix>-symbol.json + <prefix>-000N.params; returns the symbol path."""
    from tasks.importers.formats.mxnet_import import converter_python

    subprocess.run(
        [str(converter_python()), "-c", _MXNET_SCRIPT, str(prefix), str(epoch)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return Path(f"{prefix}-symbol.json")
