"""Vendor kernels on CPUs: float conv2d and dense layers as extern calls into oneDNN or a BLAS.

tvmflow's own oneDNN v3 kernels (tasks/build/native/cpu_vendor_dnnl.cc, compiled in place by
scripts/build-cpu-contrib.sh against the PyPI `onednn-devel` headers) register the packed
functions `tvmflow.dnnl.conv2d` / `tvmflow.dnnl.matmul`; cpu_vendor_cblas.cc the same two as
im2col + sgemm on OpenBLAS (PyPI `scipy-openblas32`), `tvmflow.cblas.*`. `offload` rewrites a Relax module so a
conv2d with a constant weight (and its bias add and ReLU / ReLU6, fused as oneDNN post-ops), or
a matmul with a constant weight (and its bias), becomes one `call_dps_packed` to them: no tuning
task, no TIR. Each rewritten layer gets an operator id so the per-operator pick-best
(tasks.build.candidates.choose, `vendor_choices` below) can keep the library only where it wins.

The library must be loaded into the process that runs the model: `load_library()` does it here,
and a library exported with `link_options()` pulls it in wherever it is loaded (an rpc server's
process too); a missing library is a one-line TvmflowError saying how to build it.

oneDNN is the PyPI `onednn-cpu-gomp` build (OpenMP threads; the `onednn` package's SYCL build
needed ~300 MB of SYCL/OpenCL runtime). Its OpenMP threads must not spin between calls
(OMP_WAIT_POLICY=PASSIVE, set before libgomp loads): spinning, they fight TVM's own thread pool
for the cores and EfficientNet-Lite0 ran 180 ms instead of 15 ms on the 2-core VM.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import TvmflowError


def _constant_type():
    from tvm.ir.expr import Constant

    return Constant


ROOT = Path(__file__).resolve().parents[2]
NATIVE_DIR = ROOT / "artifacts" / "native"  # scripts/build-cpu-contrib.sh writes here
# backend -> (library file, packed-function prefix)
BACKENDS = {"dnnl": ("libtvmflow_dnnl.so", "tvmflow.dnnl"), "cblas": ("libtvmflow_cblas.so", "tvmflow.cblas")}
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # see the module docstring; rpc servers get it too
POST_OPS = {None: 0, "relu": 1, "relu6": 2}

_LOADED: dict = {}


def library_path(backend: str = "dnnl") -> Path:
    if backend not in BACKENDS:
        raise TvmflowError(f"vendor backend {backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    return Path(os.environ.get("TVMFLOW_NATIVE_DIR", NATIVE_DIR)) / BACKENDS[backend][0]


def dnnl_lib_dir() -> Path | None:
    """Where libdnnl.so.3 and its dependencies are: TVMFLOW_DNNL_LIBDIR, else the environment's lib/."""
    for base in (os.environ.get("TVMFLOW_DNNL_LIBDIR"), os.path.join(sys.prefix, "lib")):
        if base and os.path.exists(os.path.join(base, "libdnnl.so.3")):
            return Path(base)
    return None


def _load_dnnl_runtime() -> None:
    libdir = dnnl_lib_dir()
    if libdir is None:
        raise TvmflowError(
            "oneDNN is not installed: pip install 'tvmflow[onednn]' (onednn-cpu-gomp, onednn-devel-cpu-gomp), "
            "or set TVMFLOW_DNNL_LIBDIR to the folder holding libdnnl.so.3"
        )
    for name, value in OMP_ENV.items():  # libgomp reads it once, when it loads (with libdnnl)
        os.environ.setdefault(name, value)
    ctypes.CDLL(str(libdir / "libdnnl.so.3"), mode=ctypes.RTLD_GLOBAL)


def load_library(backend: str = "dnnl") -> Path:
    """Load the backend's library (and its runtime) into this process, once; its packed functions
    are then global. Raises TvmflowError when something is missing."""
    if backend in _LOADED:
        return _LOADED[backend]
    lib = library_path(backend)
    if not lib.exists():
        raise TvmflowError(f"{lib} is missing: run scripts/build-cpu-contrib.sh (or set TVMFLOW_NATIVE_DIR)")
    import tvm  # noqa: F401 - libtvm_ffi must be loaded first: the kernels register into it

    if backend == "dnnl":
        _load_dnnl_runtime()
    else:  # OpenBLAS from its wheel, wherever that is installed (the build's rpath may not exist here)
        try:
            import scipy_openblas32

            ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"), mode=ctypes.RTLD_GLOBAL)
        except ImportError as err:
            raise TvmflowError(
                "OpenBLAS is not installed: pip install scipy-openblas32 (a tvmflow dependency)"
            ) from err
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _LOADED[backend] = lib
    return lib


def link_options(backend: str = "dnnl") -> list[str]:
    """Linker options for a model library whose externs call `backend`: loading that library
    then loads ours (and registers the kernels) in any process, found by absolute rpath."""
    lib = load_library(backend)
    # --no-as-needed: the model references no symbol of ours (externs are looked up by name at run time)
    return [f"-L{lib.parent}", "-Wl,--no-as-needed", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]


def available(backend: str = "dnnl") -> bool:
    """The library loads and its kernels run here (a 1x1 conv checked against numpy)."""
    try:
        load_library(backend)
        return _smoke(backend)
    except (TvmflowError, OSError, RuntimeError):
        return False


def _smoke(backend: str) -> bool:
    import numpy as np
    import tvm

    func = tvm.get_global_func(f"{BACKENDS[backend][1]}.conv2d")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 4, 4, 8), "float32"), rng.standard_normal((16, 1, 1, 8), "float32")
    b, y = np.zeros(16, "float32"), np.zeros((1, 4, 4, 16), "float32")
    out = tvm.runtime.tensor(y)
    func(tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(b), 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, out)
    return bool(np.allclose(out.numpy(), np.einsum("nhwc,oc->nhwo", x, w[:, 0, 0, :]), atol=1e-4))


@dataclass
class VendorOp:
    """One layer handed to the library: id (stable within a model), kind and what it computes."""

    op_id: str
    kind: str  # "conv2d" | "matmul"
    shape: str  # e.g. "1x56x56x64 -> 1x56x56x64 k3x3 s1 g1"
    post: str | None = None
    out_shape: tuple = ()
    w_shape: tuple = ()

    @property
    def key(self) -> tuple:
        """What identifies this operator in a profile of any build: kind, output and weight shape."""
        return (self.kind, tuple(self.out_shape), tuple(self.w_shape))

    def to_json(self) -> dict:
        return {"op_id": self.op_id, "kind": self.kind, "shape": self.shape, "post": self.post}


@dataclass
class Offloaded:
    mod: object
    ops: list[VendorOp] = field(default_factory=list)
    candidates: list[VendorOp] = field(default_factory=list)  # every layer that could go, taken or not


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _shape(expr) -> list[int] | None:
    sinfo = expr.ty
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return _ints(shape.values)
    except TypeError:
        return None


def _dtype(expr) -> str | None:
    return getattr(expr.ty, "dtype", None)


def _conv_ok(call) -> bool:
    """A float32 2-D conv with a constant weight, in a layout the kernels take."""
    Constant = _constant_type()

    attrs = call.attrs
    layouts = {("NCHW", "OIHW"), ("NHWC", "OHWI")}
    return (
        isinstance(call.args[1], Constant)
        and _dtype(call.args[0]) == "float32"
        and _dtype(call.args[1]) == "float32"
        and (attrs.data_layout, attrs.kernel_layout) in layouts
        and (attrs.out_layout or attrs.data_layout) == attrs.data_layout
        and attrs.out_dtype in ("", "float32", None)
        and _shape(call) is not None
        and _shape(call.args[0]) is not None
    )


def _matmul_ok(call) -> bool:
    Constant = _constant_type()

    a, w = call.args
    sa, sw = _shape(a), _shape(w)
    return (
        isinstance(w, Constant)
        and _dtype(a) == "float32"
        and _dtype(w) == "float32"
        and sa is not None
        and sw is not None
        and len(sa) == 2
        and len(sw) == 2
    )


def _per_channel_bias(const, channels: int, axis: int, rank: int):
    """The constant as a (channels,) float32 array when it is a per-output-channel bias."""
    import numpy as np

    value = const.value.numpy()
    if value.dtype != np.float32:
        return None
    if value.ndim == 1 and value.shape[0] == channels and axis == rank - 1:
        return value
    if value.ndim == rank and value.shape[axis] == channels and value.size == channels:
        return value.reshape(channels)
    return None


def offload(mod, target=None, only: set | None = None, backend: str = "dnnl") -> Offloaded:
    """`mod` with every eligible conv2d / matmul (and bias, ReLU / ReLU6 after it) as an extern
    call to `backend` ("dnnl" or "cblas": grouped convs stay TVM's); `only`: just these operator
    ids (None: all). Ids are "conv2d_<i>" / "matmul_<i>" in the order the layers appear in
    `main`, the same before and after the rewrite and for either backend."""
    prefix = BACKENDS[backend][1] if backend in BACKENDS else library_path(backend)
    import numpy as np
    import tvm
    from tvm import relax

    if target is not None:
        target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
        if target.kind.name != "llvm":
            return Offloaded(mod)
    result = Offloaded(mod)
    Constant = _constant_type()

    def visit(func):
        bindings = {}
        uses: dict = {}
        order = []
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bindings[b.var] = b.value
                    order.append(b.var)
                    for arg in getattr(b.value, "args", []) or []:
                        for v in arg.fields if isinstance(arg, relax.Tuple) else [arg]:
                            if isinstance(v, relax.Var):
                                uses[v] = uses.get(v, 0) + 1
        for v in relax.analysis.free_vars(func.body.body) if hasattr(func.body, "body") else []:
            uses[v] = uses.get(v, 0) + 1
        if isinstance(func.body.body, relax.Var):
            uses[func.body.body] = uses.get(func.body.body, 0) + 1

        def consumer(var, op_name):
            """The single binding that uses `var`, when it is a call of `op_name`."""
            if uses.get(var, 0) != 1:
                return None
            for other in order:
                value = bindings[other]
                if (
                    isinstance(value, relax.Call)
                    and isinstance(value.op, tvm.ir.Op)
                    and value.op.name in op_name
                    and any(a.same_as(var) for a in value.args)
                ):
                    return other
            return None

        plans = {}  # end var -> (kind, first call, bias np, post, op)
        counters = {"conv2d": 0, "matmul": 0}
        for var in order:
            call = bindings[var]
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
                continue
            kind = {"relax.nn.conv2d": "conv2d", "relax.matmul": "matmul"}.get(call.op.name)
            if kind is None or not (_conv_ok(call) if kind == "conv2d" else _matmul_ok(call)):
                continue
            op_id = f"{kind}_{counters[kind]}"
            counters[kind] += 1
            out_shape = _shape(call)
            if kind == "conv2d":
                nhwc = call.attrs.data_layout == "NHWC"
                channels, axis = out_shape[3 if nhwc else 1], (3 if nhwc else 1)
            else:
                channels, axis = out_shape[-1], len(out_shape) - 1
            end, bias, post = var, None, None
            add = consumer(var, ("relax.add",))
            if add is not None:
                other = [a for a in bindings[add].args if not a.same_as(var)]
                if other and isinstance(other[0], Constant):
                    bias = _per_channel_bias(other[0], channels, axis, len(out_shape))
                    if bias is not None:
                        end = add
            act = consumer(end, ("relax.nn.relu", "relax.clip"))
            if act is not None:
                value = bindings[act]
                if value.op.name == "relax.nn.relu":
                    post, end = "relu", act
                elif len(value.args) == 3 and all(hasattr(a, "value") for a in value.args[1:]):
                    lo, hi = (float(getattr(a.value, "value", a.value)) for a in value.args[1:])
                    if (lo, hi) == (0.0, 6.0):
                        post, end = "relu6", act
            x_shape = _shape(call.args[0])
            if kind == "conv2d":
                a = call.attrs
                w = _shape(call.args[1])
                kernel = w[1:3] if a.data_layout == "NHWC" else w[2:4]
                desc = (
                    f"{'x'.join(map(str, x_shape))} -> {'x'.join(map(str, out_shape))} "
                    f"k{'x'.join(map(str, kernel))} s{int(a.strides[0])} g{int(a.groups)} {a.data_layout}"
                )
            else:
                desc = f"{'x'.join(map(str, x_shape))} @ {'x'.join(map(str, _shape(call.args[1])))}"
            op = VendorOp(op_id, kind, desc, post, tuple(out_shape), tuple(_shape(call.args[1])))
            result.candidates.append(op)
            if only is not None and op_id not in only:
                continue
            if backend == "cblas" and kind == "conv2d" and int(call.attrs.groups) != 1:
                continue
            if bias is None:
                bias = np.zeros(channels, dtype="float32")
            plans[end] = (kind, call, bias, post, op)
        return plans

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod, plans):
            super().__init__(mod)
            self.plans = plans

        def visit_var_binding_(self, binding):
            plan = self.plans.get(binding.var)
            if plan is None:
                return super().visit_var_binding_(binding)
            kind, call, bias, post, op = plan
            x = self.visit_expr(call.args[0])
            out = relax.TensorType(_shape(binding.var), "float32")
            bias_c = relax.const(bias.astype("float32"))

            def prim(v):
                return relax.prim_value(tvm.tirx.IntImm("int64", int(v)))

            if kind == "conv2d":
                a = call.attrs
                pad = _ints(a.padding)
                pad = pad * 2 if len(pad) == 2 else pad
                args = [
                    x,
                    call.args[1],
                    bias_c,
                    prim(a.strides[0]),
                    prim(a.strides[1]),
                    prim(pad[0]),
                    prim(pad[1]),
                    prim(pad[2]),
                    prim(pad[3]),
                    prim(a.dilation[0]),
                    prim(a.dilation[1]),
                    prim(a.groups),
                    prim(a.data_layout == "NHWC"),
                    prim(POST_OPS[post]),
                ]
                new = relax.call_dps_packed(relax.ExternFunc(f"{prefix}.conv2d"), relax.Tuple(args), out)
            else:
                new = relax.call_dps_packed(
                    relax.ExternFunc(f"{prefix}.matmul"),
                    relax.Tuple([x, call.args[1], bias_c, prim(POST_OPS[post])]),
                    out,
                )
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))
            result.ops.append(op)

    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        plans = visit(func)
        if not plans:
            continue
        rewriter = Rewriter(mod, plans)
        updates[gvar] = rewriter.visit_expr(func)
    if not updates:
        return result
    new_mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gvar, func in updates.items():
        new_mod[gvar] = func
    result.mod = relax.transform.DeadCodeElimination()(new_mod)
    return result


# ---- per-operator pick-best: time each operator in a TIR build and in a vendor build
def profile_calls(ex, x, rounds: int = 3) -> list[tuple[str, float, str]]:
    """(kernel or extern name, median us, shape key) of every call of `main` on `x` (one input array
    or a list of them), in call order. TVM 0.27's VM
    has no profiler: a VM instrument stamps the time around every call (as bench/compile_bench.py)."""
    import time

    import numpy as np
    import tvm
    from tvm import relax
    from tvm.runtime.vm import VMInstrumentReturnKind

    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
    vm["main"](*args)
    calls: list = []
    stamp: dict = {}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            stamp[symbol] = time.perf_counter()
        else:
            us = (time.perf_counter() - stamp[symbol]) * 1e6
            shapes = [tuple(int(d) for d in a.shape) for a in call_args if hasattr(a, "shape")]
            calls.append((str(symbol), us, _call_key(str(symbol), shapes)))
        return VMInstrumentReturnKind.NO_OP

    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    per_round = []
    for _ in range(rounds):
        calls.clear()
        vm["main"](*args)
        per_round.append(list(calls))
    keep = [c for c in per_round[0] if not c[0].startswith("vm.builtin")]
    rows = [[c for c in r if not c[0].startswith("vm.builtin")] for r in per_round]
    return [(name, float(np.median([r[i][1] for r in rows])), key) for i, (name, _, key) in enumerate(keep)]


def _call_key(name: str, shapes: list) -> tuple | None:
    """(kind, output shape, weight shape) of a conv / matmul call, from its argument shapes: the
    output is the last argument (destination passing); the weight is the input whose leading
    (conv: O of OIHW / OHWI) or trailing (matmul: N of K x N) extent is the output's channels."""
    kind = "conv2d" if "conv2d" in name else "matmul" if "matmul" in name else None
    if kind is None or not shapes:
        return None
    out, ins = shapes[-1], shapes[:-1]
    if kind == "conv2d" and len(out) == 4:
        for channels in (out[3], out[1]):
            weight = next((s for s in ins if len(s) == 4 and s[0] == channels and s[0] != out[0]), None)
            if weight is not None:
                return (kind, out, weight)
    if kind == "matmul":
        weight = next((s for s in ins if len(s) == 2 and s[-1] == out[-1] and s != out), None)
        if weight is not None:
            return (kind, out, weight)
    return (kind, out, None)


EPILOGUE = ("fused_add", "add", "relu", "clip", "fused_relu", "fused_clip")


def operator_times(calls) -> dict[tuple, tuple[float, str]]:
    """Per operator key (kind, output shape, weight shape, n-th such operator): its time in us
    and the kernel name. Keys, not call order: fusion moves a residual branch's conv before or
    after the main branch's depending on what got fused, so the n-th conv of two builds can be
    different layers. An extern call counts with the element-wise kernel right after it (the
    residual add / ReLU that the TIR build fuses into its conv kernel)."""
    out: dict = {}
    seen: dict = {}
    i = 0
    while i < len(calls):
        name, us, key = calls[i]
        if key is None:
            i += 1
            continue
        if name.startswith("tvmflow.") and i + 1 < len(calls) and calls[i + 1][0].startswith(EPILOGUE):
            us += calls[i + 1][1]
            i += 1
        n = seen[key] = seen.get(key, -1) + 1
        out[(*key, n)] = (us, name)
        i += 1
    return out


def vendor_choices(
    tir_calls, vendor_calls, vendor: str, ops: list, tuned_names: set[str] | None = None, default_calls=None
):
    """list[OperatorChoice], one per layer of `ops` (offload(...).candidates, graph order):
    the TIR build's kernel (tuned when its name is in `tuned_names`; `default_calls`, a build
    without database, then gives the default candidate) against the vendor build's call."""
    from tasks.build.candidates import Candidate, choose

    tir, lib = operator_times(tir_calls), operator_times(vendor_calls)
    dflt = operator_times(default_calls) if default_calls is not None else None
    seen: dict = {}
    choices = []
    for op in ops:
        n = seen[op.key] = seen.get(op.key, -1) + 1
        key = (*op.key, n)
        cands = []
        us, kernel = tir.get(key, (None, "?"))
        if tuned_names is not None:
            cands.append(
                Candidate("tuned", us / 1000)
                if us is not None and kernel in tuned_names
                else Candidate("tuned", None, "no tuning record")
            )
            if dflt and key in dflt:
                cands.append(Candidate("default", dflt[key][0] / 1000))
        else:
            cands.append(Candidate("default", us / 1000) if us is not None else Candidate("default", None, "not found"))
        if key in lib and lib[key][1].startswith("tvmflow."):
            cands.append(Candidate(vendor, lib[key][0] / 1000))
        else:
            cands.append(Candidate(vendor, None, "not offloaded (grouped conv or unsupported)"))
        choice = choose(op.op_id, cands)
        choice.operator = f"{op.op_id} ({kernel}; {op.shape})"
        choices.append(choice)
    return choices


def winners_of(choices, vendor: str) -> set[str]:
    """Operator ids whose chosen backend is `vendor`: prepare_for_tuning(vendor_only=...)."""
    return {c.operator.split(" ")[0] for c in choices if c.chosen == vendor}
