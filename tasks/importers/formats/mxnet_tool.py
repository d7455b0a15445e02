"""MXNet side of the MXNet support: runs ONLY inside the converter environment (.venv-mxnet, made by
scripts/setup-mxnet.sh), never imported by tvmflow itself. Standard library + numpy + mxnet + onnx.

  python mxnet_tool.py convert SYMBOL PARAMS OUT.onnx [--input name:1x3x224x224:float32 ...]
  python mxnet_tool.py serve SYMBOL PARAMS        (JSON lines on stdin: {"in", "out", "repeat"})

Why a separate process: MXNet 1.9.1 needs numpy<2 plus alias shims, and it changes process-wide
thread settings; the pipeline consumes the ONNX it writes, and the reference runs here.
"""

import json
import sys
import time

import numpy as np

# MXNet 1.9.1 still uses aliases that numpy 1.24 removed
for _name, _value in {"bool": bool, "int": int, "float": float, "object": object, "str": str}.items():
    if _name not in np.__dict__:
        setattr(np, _name, _value)

import mxnet as mx  # noqa: E402

USAGE_ERROR = 3


def _params(path):
    loaded = mx.nd.load(path)
    return {k.split(":", 1)[-1]: v for k, v in loaded.items()}


def data_inputs(symbol_path, params_path):
    """Arguments of the symbol that are not weights: the model's inputs, in order."""
    sym = mx.sym.load(symbol_path)
    weights = set(_params(params_path))
    return [a for a in sym.list_inputs() if a not in weights]


def _parse_inputs(args):
    specs = {}
    for text in args:
        name, shape, *rest = text.split(":")
        specs[name] = (tuple(int(d) for d in shape.split("x")), rest[0] if rest else "float32")
    return specs


def convert(symbol_path, params_path, out_path, input_args):
    import onnx
    import onnx.defs

    names = data_inputs(symbol_path, params_path)
    specs = _parse_inputs(input_args)
    missing = [n for n in names if n not in specs]
    unknown = [n for n in specs if n not in names]
    if missing or unknown:
        hint = " ".join(f"--input {n}:1x3x224x224:float32" for n in missing)
        print(
            json.dumps(
                {
                    "error": (
                        f"MXNet symbols carry no input shapes: give {hint}"
                        if missing
                        else f"--input names {unknown} are not inputs of the model; its inputs are {names}"
                    ),
                    "inputs": names,
                }
            )
        )
        return USAGE_ERROR
    # opset 17: what MXNet's converter and TVM's ONNX frontend both handle (onnx 1.14 would say 19)
    onnx.defs.onnx_opset_version = lambda: 17
    mx.onnx.export_model(
        symbol_path, params_path, [specs[n][0] for n in names], [np.dtype(specs[n][1]) for n in names], out_path
    )
    model = onnx.load(out_path)
    # weights listed as graph inputs too: keep only the real inputs (ORT and TVM then fold them)
    weights = {init.name for init in model.graph.initializer}
    real = [v for v in model.graph.input if v.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(real)
    model.ir_version = min(model.ir_version, 9)  # what onnxruntime accepts
    onnx.checker.check_model(model)
    onnx.save(model, out_path)
    print(json.dumps({"inputs": names, "outputs": [o.name for o in model.graph.output]}))
    return 0


def serve(symbol_path, params_path):
    names = data_inputs(symbol_path, params_path)
    net = mx.gluon.SymbolBlock.imports(symbol_path, names, params_path, ctx=mx.cpu())
    print(json.dumps({"ready": True, "inputs": names}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            data = np.load(req["in"])
            args = [mx.nd.array(data[n], dtype=data[n].dtype) for n in names]

            def forward():
                out = net(*args)  # noqa: B023
                outs = out if isinstance(out, (list, tuple)) else [out]
                return [o.asnumpy() for o in outs]  # asnumpy waits for MXNet's async engine

            outs = forward()
            times = []
            for _ in range(int(req.get("repeat", 0))):
                start = time.perf_counter()
                forward()
                times.append((time.perf_counter() - start) * 1000)
            np.savez(req["out"], *outs)
            reply = {"ok": True, "ms": float(np.median(times)) if times else None}
        except Exception as err:  # noqa: BLE001 - report to the parent instead of dying
            reply = {"ok": False, "error": f"{err.__class__.__name__}: {str(err).splitlines()[0][:300]}"}
        print(json.dumps(reply), flush=True)
    return 0


def main(argv):
    if len(argv) >= 4 and argv[0] == "convert":
        inputs = [argv[i + 1] for i, a in enumerate(argv) if a == "--input"]
        return convert(argv[1], argv[2], argv[3], inputs)
    if len(argv) == 3 and argv[0] == "serve":
        return serve(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
