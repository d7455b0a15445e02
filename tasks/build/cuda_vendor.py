"""cuDNN / cuBLAS kernels inside TVM GPU builds.

The apache-tvm wheel ships the runtime sources of TVM's cuDNN and cuBLAS contrib
(`tvm/src/runtime/extra/contrib/{cudnn,cublas}`) but not a library built from them. `build_contrib`
compiles them on the GPU host against the CUDA / cuDNN / cuBLAS headers and libraries that are
there (torch's CUDA wheels bring them) into one shared library that registers
`tvm.contrib.cudnn.conv2d.forward` and `tvm.contrib.cublas.matmul`. `load_contrib` loads it into
the process; a built executable calls those functions by name at run time.

`vendor_legalize_map` turns chosen conv2d / matmul calls into extern calls (te.extern + call_packed)
during LegalizeOps; every other operator keeps TVM's own lowering.

A published build that uses extern kernels needs that library on the device: `runtime_manifest`
names each library with its sha256, `verify_runtime_libraries` checks a fetched copy before
`load_runtime_libraries` loads it.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.errors import TvmflowError

VENDORS = ("cudnn", "cublas")
SOURCES = {
    "cudnn": ("cudnn/conv_forward.cc", "cudnn/cudnn_utils.cc"),
    "cublas": ("cublas/cublas.cc", "cublas/cublas_utils.cc"),
}
HEADERS = {"cudnn": "cudnn.h", "cublas": "cublas_v2.h", "cudart": "cuda_runtime.h"}
LIBRARIES = {"cudnn": ("cudnn",), "cublas": ("cublas", "cublasLt"), "cudart": ("cudart",)}
GLOBALS = {"cudnn": "tvm.contrib.cudnn.conv2d.forward", "cublas": "tvm.contrib.cublas.matmul"}
LIBRARY_NAME = "libtvmflow_cuda_contrib.so"
MANIFEST_NAME = "runtime_libraries.json"
# cuDNN tensor formats / conv mode as its API numbers them
CUDNN_NCHW, CUDNN_NHWC, CUDNN_CROSS_CORRELATION = 0, 1, 1
IMPLICIT_PRECOMP_GEMM = 1  # always applicable, also in NHWC; the fallback when no algo search ran


# ---------------------------------------------------------------- building the contrib library


def contrib_source_dir() -> Path:
    import tvm

    return Path(tvm.__file__).parent / "src" / "runtime" / "extra" / "contrib"


@dataclass
class CudaPaths:
    """Where the GPU host keeps the headers and shared libraries a contrib build needs."""

    include: list[str]
    lib: list[str]
    libs: dict[str, str]  # library stem -> file name found (libcudnn.so.9: wheels ship no unversioned link)


def _search_roots() -> list[Path]:
    roots = [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if p]
    for entry in sys.path:
        if entry and (Path(entry) / "nvidia").is_dir():
            roots.extend(sorted(p for p in (Path(entry) / "nvidia").iterdir() if p.is_dir()))
    extra = os.environ.get("TVMFLOW_CUDA_ROOTS", "")
    roots = [Path(p) for p in extra.split(os.pathsep) if p] + roots
    return [r for r in roots if r.is_dir()]


def find_cuda_paths(vendors=VENDORS) -> CudaPaths:
    """Headers and libraries for `vendors` (plus the CUDA runtime) under CUDA_HOME, /usr/local/cuda,
    every `site-packages/nvidia/*` (torch's CUDA wheels) and TVMFLOW_CUDA_ROOTS."""
    include, lib, libs = [], [], {}
    for need in ("cudart", *vendors):
        header = HEADERS[need]
        found = next((str(r / "include") for r in _search_roots() if (r / "include" / header).is_file()), None)
        if found is None:
            raise TvmflowError(
                f"{header} not found (searched CUDA_HOME, /usr/local/cuda, site-packages/nvidia/*): "
                f"install the {need} headers or set TVMFLOW_CUDA_ROOTS"
            )
        if found not in include:
            include.append(found)
        for stem in LIBRARIES[need]:
            hit = None
            for root in _search_roots():
                for sub in ("lib64", "lib", "lib/x64"):
                    names = sorted(glob.glob(str(root / sub / f"lib{stem}.so*")), key=len)
                    if names:
                        hit = Path(names[0])
                        break
                if hit:
                    break
            if hit is None:
                raise TvmflowError(f"lib{stem}.so not found for {need}: install it or set TVMFLOW_CUDA_ROOTS")
            libs[stem] = hit.name
            if str(hit.parent) not in lib:
                lib.append(str(hit.parent))
    return CudaPaths(include, lib, libs)


def _tvm_dirs() -> tuple[list[str], list[str]]:
    import tvm
    import tvm_ffi

    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    return [str(tvm_dir / "include"), str(ffi_dir / "include")], [str(tvm_dir / "lib"), str(ffi_dir / "lib")]


def compile_commands(
    build_dir: Path, vendors=VENDORS, paths: CudaPaths | None = None, cxx: str | None = None
) -> tuple[list[list[str]], list[str]]:
    """The compiler commands (one per source, then the link) that build LIBRARY_NAME in build_dir."""
    paths = paths or find_cuda_paths(vendors)
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    src = contrib_source_dir()
    # cublas.cc includes "../../../../../3rdparty/compiler-rt/builtin_fp16.h" (not shipped in the wheel,
    # and nothing of it is used: `half` comes from cuda_fp16.h). An include dir five levels below
    # an empty stand-in makes that relative path resolve.
    stub = build_dir / "stub"
    deep = stub / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True, exist_ok=True)
    (stub / "3rdparty" / "compiler-rt").mkdir(parents=True, exist_ok=True)
    (stub / "3rdparty" / "compiler-rt" / "builtin_fp16.h").write_text(
        "/* empty: TVM's cublas.cc includes this path but uses nothing from it */\n"
    )
    tvm_inc, tvm_lib = _tvm_dirs()
    flags = ["-O2", "-std=c++17", "-fPIC", "-DNDEBUG", *(f"-I{p}" for p in (*tvm_inc, *paths.include)), f"-I{deep}"]
    compiles, objects = [], []
    for vendor in vendors:
        for rel in SOURCES[vendor]:
            obj = build_dir / (rel.replace("/", "_") + ".o")
            compiles.append([cxx, *flags, "-c", str(src / rel), "-o", str(obj)])
            objects.append(str(obj))
    stems = [s for v in ("cudart", *vendors) for s in LIBRARIES[v]]
    link = [
        cxx,
        "-shared",
        "-o",
        str(build_dir / LIBRARY_NAME),
        *objects,
        *(f"-L{d}" for d in (*tvm_lib, *paths.lib)),
        "-ltvm_runtime",
        "-ltvm_ffi",
        *(f"-l:{paths.libs[s]}" for s in stems),
        *(f"-Wl,-rpath,{d}" for d in (*tvm_lib, *paths.lib)),
    ]
    return compiles, link


def build_contrib(build_dir, vendors=VENDORS, jobs: int = 0, log=print) -> Path:
    """Compile TVM's contrib sources for `vendors` into build_dir/LIBRARY_NAME (about 20 s)."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    compiles, link = compile_commands(build_dir, vendors)

    def run(cmd):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise TvmflowError(f"contrib build failed: {' '.join(cmd[-3:])}: {done.stderr.strip()[-1500:]}")

    with ThreadPoolExecutor(max_workers=jobs or len(compiles)) as pool:
        list(pool.map(run, compiles))
    run(link)
    out = build_dir / LIBRARY_NAME
    (build_dir / MANIFEST_NAME).write_text(json.dumps(runtime_manifest([out], vendors), indent=1))
    log(f"built {out} ({out.stat().st_size // 1024} KiB) for {', '.join(vendors)}")
    return out


# ---------------------------------------------------------------- loading it


def load_contrib(path) -> list[str]:
    """Load a contrib library into this process; returns the vendors whose functions it registered."""
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return available_vendors()


def available_vendors() -> list[str]:
    import tvm_ffi

    return [v for v, name in GLOBALS.items() if tvm_ffi.get_global_func(name, allow_missing=True) is not None]


# ---------------------------------------------------------------- manifest of extra runtime libraries


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RuntimeLibrary:
    """One extra shared library a built executable needs at run time."""

    name: str  # file name, e.g. libtvmflow_cuda_contrib.so
    sha256: str
    bytes: int
    provides: list[str]  # global functions the executable calls into it
    needs: list[str]  # system libraries it links (from the GPU host: cuDNN, cuBLAS, CUDA runtime)


def runtime_manifest(paths, vendors=VENDORS) -> list[dict]:
    """The manifest entries for the given libraries (what a published build records)."""
    needs = sorted({f"lib{s}" for v in ("cudart", *vendors) for s in LIBRARIES[v]})
    return [
        asdict(RuntimeLibrary(Path(p).name, sha256_of(p), Path(p).stat().st_size, [GLOBALS[v] for v in vendors], needs))
        for p in paths
    ]


def used_globals(executable_or_source: str) -> list[str]:
    """Which contrib functions a build calls (searched in its host code / generated source)."""
    return [name for name in GLOBALS.values() if name in executable_or_source]


def needed_libraries(choices, manifest: list[dict]) -> list[dict]:
    """The manifest entries a build needs: those providing a vendor backend some operator chose."""
    chosen = {GLOBALS[c.chosen] for c in choices if c.chosen in GLOBALS}
    return [entry for entry in manifest if chosen & set(entry.get("provides", []))]


def verify_runtime_libraries(manifest: list[dict], directory) -> list[Path]:
    """Each manifest entry present in `directory` with its recorded sha256; else one-line error."""
    found = []
    for entry in manifest:
        path = Path(directory) / entry["name"]
        if not path.is_file():
            raise TvmflowError(f"runtime library {entry['name']} missing in {directory}: fetch the build again")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise TvmflowError(
                f"runtime library {entry['name']} has sha256 {digest[:12]}..., the build recorded "
                f"{entry['sha256'][:12]}...: fetch it again (or rebuild the build on this host)"
            )
        found.append(path)
    return found


def load_runtime_libraries(manifest: list[dict], directory) -> list[str]:
    """Verify, then load the libraries a build needs; returns the vendors now available."""
    for path in verify_runtime_libraries(manifest, directory):
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return available_vendors()


# ---------------------------------------------------------------- operators and their extern forms


@dataclass(frozen=True)
class ConvSpec:
    """A static 2-D convolution as the Relax graph has it (the unit pick-best decides on)."""

    data: tuple
    weight: tuple
    strides: tuple
    padding: tuple  # top, left, bottom, right
    dilation: tuple
    groups: int
    data_layout: str
    kernel_layout: str
    dtype: str
    out_dtype: str

    @property
    def key(self) -> str:
        dims = lambda t: "x".join(map(str, t))  # noqa: E731
        return (
            f"conv2d_{self.data_layout}_{dims(self.data)}_w{dims(self.weight)}_s{dims(self.strides)}"
            f"_p{dims(self.padding)}_d{dims(self.dilation)}_g{self.groups}_{self.dtype}_{self.out_dtype}"
        )

    @property
    def depthwise(self) -> bool:
        channels = self.data[self.data_layout.index("C")]
        return self.groups > 1 and self.groups == channels

    @property
    def vendor_ok(self) -> str | None:
        """Why cuDNN cannot run it (None: it can)."""
        if (self.data_layout, self.kernel_layout) not in (("NHWC", "OHWI"), ("NCHW", "OIHW")):
            return f"layout {self.data_layout}/{self.kernel_layout}"
        if self.padding[0] != self.padding[2] or self.padding[1] != self.padding[3]:
            return "asymmetric padding"
        if self.dtype not in ("float16", "float32"):
            return f"dtype {self.dtype}"
        return None


@dataclass(frozen=True)
class MatmulSpec:
    """A static 2-D matmul (a dense / linear layer after its weight transpose is folded)."""

    lhs: tuple
    rhs: tuple
    dtype: str
    out_dtype: str

    @property
    def key(self) -> str:
        return f"matmul_{'x'.join(map(str, self.lhs))}_{'x'.join(map(str, self.rhs))}_{self.dtype}_{self.out_dtype}"

    @property
    def vendor_ok(self) -> str | None:
        if len(self.lhs) != 2 or len(self.rhs) != 2:
            return "not 2-D"
        if self.dtype not in ("float16", "float32"):
            return f"dtype {self.dtype}"
        return None


def _ty(expr):
    """An expression's tensor type (TVM 0.27 names it `ty`; earlier releases `struct_info`)."""
    return getattr(expr, "ty", None) or getattr(expr, "struct_info", None)


def _static(ty) -> tuple | None:
    try:
        shape = ty.shape
        return tuple(int(d) for d in getattr(shape, "values", shape))
    except (AttributeError, TypeError, ValueError):
        return None


def op_spec(call):
    """ConvSpec / MatmulSpec of a relax call (None: another op, or a dynamic shape)."""
    name = getattr(call.op, "name", "")
    if name not in ("relax.nn.conv2d", "relax.matmul"):
        return None
    lhs, rhs = (_static(_ty(a)) for a in call.args[:2])
    if lhs is None or rhs is None:
        return None
    dtype = str(_ty(call.args[0]).dtype)
    out_dtype = str(_ty(call).dtype)
    if name == "relax.matmul":
        return MatmulSpec(lhs, rhs, dtype, out_dtype)
    a = call.attrs
    return ConvSpec(
        lhs,
        rhs,
        tuple(int(x) for x in a.strides),
        tuple(int(x) for x in a.padding),
        tuple(int(x) for x in a.dilation),
        int(a.groups),
        str(a.data_layout),
        str(a.kernel_layout),
        dtype,
        out_dtype,
    )


def collect_specs(mod) -> dict:
    """Every distinct conv2d / matmul of a Relax module, by key."""
    from tvm import relax

    found: dict = {}

    @relax.expr_functor.visitor
    class Visitor(relax.PyExprVisitor):
        def visit_call_(self, call):  # noqa: N802 - visitor protocol
            spec = op_spec(call)
            if spec is not None:
                found.setdefault(spec.key, spec)
            for arg in call.args:
                self.visit_expr(arg)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            Visitor().visit_expr(func)
    return found


def cudnn_conv_te(spec: ConvSpec, x, w, algo: int):
    """cuDNN convolution as a te.extern (fp16 I/O computes in fp32, as torch's does)."""
    from tvm.contrib import cudnn

    fmt = CUDNN_NHWC if spec.data_layout == "NHWC" else CUDNN_NCHW
    return cudnn.conv_forward(
        x,
        w,
        [spec.padding[0], spec.padding[1]],
        list(spec.strides),
        list(spec.dilation),
        CUDNN_CROSS_CORRELATION,
        fmt,
        algo,
        "float32",
        groups=spec.groups,
        verbose=False,
    )


def cublas_matmul_te(spec: MatmulSpec, a, b):
    from tvm.contrib import cublas

    return cublas.matmul(a, b, dtype=spec.out_dtype)


def find_cudnn_algo(spec: ConvSpec) -> int:
    """cuDNN's own fastest forward algorithm for this shape (needs the library loaded and a GPU)."""
    from tvm.contrib import cudnn

    fmt = CUDNN_NHWC if spec.data_layout == "NHWC" else CUDNN_NCHW
    out = cudnn.conv_output_shape(
        fmt,
        [spec.padding[0], spec.padding[1]],
        list(spec.strides),
        list(spec.dilation),
        list(spec.data),
        list(spec.weight),
        spec.dtype,
        "float32",
        spec.groups,
    )
    return int(
        cudnn.conv_forward_find_algo(
            fmt,
            [spec.padding[0], spec.padding[1]],
            list(spec.strides),
            list(spec.dilation),
            list(spec.data),
            list(spec.weight),
            out,
            spec.dtype,
            "float32",
            spec.groups,
            False,
        )
    )


def vendor_prim_func(spec, algo: int = IMPLICIT_PRECOMP_GEMM):
    """The extern kernel alone, as a PrimFunc module (what pick-best times for the vendor candidate)."""
    import tvm
    from tvm import te

    if isinstance(spec, ConvSpec):
        x, w = te.placeholder(spec.data, spec.dtype, "x"), te.placeholder(spec.weight, spec.dtype, "w")
        y = cudnn_conv_te(spec, x, w, algo)
    else:
        x, w = te.placeholder(spec.lhs, spec.dtype, "a"), te.placeholder(spec.rhs, spec.dtype, "b")
        y = cublas_matmul_te(spec, x, w)
    return tvm.IRModule({"main": te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")})


def vendor_legalize_map(choose, algos: dict | None = None) -> dict:
    """customize_legalize_map for LegalizeOps: a conv2d / matmul whose spec `choose(spec)` maps to
    "cudnn" / "cublas" becomes an extern call; any other stays with TVM's legalization, under the
    PrimFunc name `choose` gives with a "tir:" prefix (e.g. "tir:conv2d_dlfallback", so the
    default-schedule rule that won can be applied to the fused kernel)."""
    import tvm
    from tvm import topi

    algos = algos or {}
    default = {name: tvm.ir.Op.get(name).get_attr("FLegalize") for name in ("relax.nn.conv2d", "relax.matmul")}

    def cast_back(bb, out, spec):
        if spec.dtype != spec.out_dtype:  # the extern writes the input dtype
            return bb.call_te(topi.cast, bb.emit(out), spec.out_dtype, primfunc_name_hint="cast")
        return out

    def conv2d(bb, call):
        spec = op_spec(call)
        pick = choose(spec) if spec is not None else None
        if pick == "cudnn" and spec.vendor_ok is None:
            out = bb.call_te(
                lambda x, w: cudnn_conv_te(spec, x, w, algos.get(spec.key, IMPLICIT_PRECOMP_GEMM)),
                call.args[0],
                call.args[1],
                primfunc_name_hint="cudnn_conv2d",
            )
            return cast_back(bb, out, spec)
        if isinstance(pick, str) and pick.startswith("tir:"):
            a = call.attrs
            return bb.call_te(
                topi.nn.conv,
                inp=call.args[0],
                filt=call.args[1],
                stride=a.strides,
                padding=a.padding,
                dilation=a.dilation,
                groups=a.groups,
                data_layout=a.data_layout,
                kernel_layout=a.kernel_layout,
                out_dtype=a.out_dtype or None,
                primfunc_name_hint=pick[4:],
            )
        return default["relax.nn.conv2d"](bb, call)

    def matmul(bb, call):
        spec = op_spec(call)
        if spec is not None and choose(spec) == "cublas" and spec.vendor_ok is None:
            return bb.call_te(
                lambda a, b: cublas_matmul_te(spec, a, b),
                call.args[0],
                call.args[1],
                primfunc_name_hint="cublas_matmul",
            )
        return default["relax.matmul"](bb, call)

    return {"relax.nn.conv2d": conv2d, "relax.matmul": matmul}


def main(argv=None) -> int:
    """`python -m tasks.build.cuda_vendor BUILD_DIR [cudnn cublas]`: build and load-check the library."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__)
        return 2
    vendors = tuple(argv[1:]) or VENDORS
    path = build_contrib(argv[0], vendors)
    print("loaded:", load_contrib(path))
    print(json.dumps(runtime_manifest([path], vendors), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
