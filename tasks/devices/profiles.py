"""Device profiles from the fleet file (deployments/devices.yaml)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.devices import android
from tasks.errors import TvmflowError

FLEET_FILE = Path(__file__).resolve().parents[2] / "deployments" / "devices.yaml"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    target: dict
    rpc_key: str
    cross_compiler: str | None = None
    default_trials: int = 200
    precisions: tuple = ("fp32",)
    local_workers: int = 0
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    def runs_on_host(self) -> bool:
        """A CPU target this machine can execute (no cross triple): kernels can be checked here."""
        return self.target.get("kind") == "llvm" and "mtriple" not in self.target

    def target_key(self) -> str:
        """A stable string for cache keys."""
        return str(sorted(self.target.items()))

    def compiler_command(self) -> str | None:
        """The cross compiler as a command (what tuning builders get): the NDK clang resolved from
        ANDROID_NDK_HOME / TVM_NDK_CC for `android-ndk`, else the fleet file's value."""
        if self.cross_compiler == android.MARKER:
            return android.ndk_compiler(
                int(self.extra.get("android_api", android.DEFAULT_API)),
                self.target.get("mtriple", "aarch64-linux-android"),
            )
        return self.cross_compiler

    def export_compiler(self):
        """The `fcompile` for export_library: the cross compiler, or None for the host's."""
        if not self.cross_compiler:
            return None
        if self.cross_compiler == android.MARKER:  # the NDK's clang, from ANDROID_NDK_HOME / TVM_NDK_CC
            return android.ndk_fcompile(
                int(self.extra.get("android_api", android.DEFAULT_API)),
                self.target.get("mtriple", "aarch64-linux-android"),
            )
        if shutil.which(self.cross_compiler) is None:
            raise TvmflowError(
                f"cross compiler {self.cross_compiler!r} for device {self.name!r} is not installed; "
                "install it (Debian: apt-get install gcc-aarch64-linux-gnu) or fix cross_compiler in the fleet file"
            )
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)


def _resolve_host_values(target: dict) -> dict:
    resolved = dict(target)
    if resolved.get("mcpu") == "host":
        from tvm.target import codegen

        resolved["mcpu"] = codegen.llvm_get_system_cpu()
    if resolved.get("num-cores") == "host":
        resolved["num-cores"] = os.cpu_count() or 1
    return resolved


def load_fleet(path: str | os.PathLike | None = None) -> dict[str, DeviceProfile]:
    path = Path(path or os.environ.get("TVMFLOW_FLEET") or FLEET_FILE)
    try:
        raw = yaml.safe_load(path.read_text())["devices"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise TvmflowError(f"cannot read the fleet file {path}: {err}; it needs a top-level `devices:` map") from None
    known = {f for f in DeviceProfile.__dataclass_fields__ if f not in ("name", "extra")}
    fleet = {}
    try:
        for name, spec in raw.items():
            fleet[name] = _profile(name, dict(spec), known)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise TvmflowError(
            f"bad device entry in the fleet file {path} ({err.__class__.__name__}: {err}); "
            "each device needs at least `target` (a dict) and `rpc_key`"
        ) from None
    return fleet


def _profile(name: str, spec: dict, known: set) -> DeviceProfile:
    spec["target"] = _resolve_host_values(spec["target"])
    if spec.get("precisions") == "host":  # detected from this CPU's flags (tasks.precision.policy)
        from tasks.precision.policy import host_precisions

        spec["precisions"] = host_precisions()
    elif "precisions" in spec:
        spec["precisions"] = tuple(spec["precisions"])
    extra = {k: spec.pop(k) for k in list(spec) if k not in known}
    return DeviceProfile(name=name, extra=extra, **spec)


def get_device(name: str, path: str | os.PathLike | None = None) -> DeviceProfile:
    fleet = load_fleet(path)
    if name not in fleet:
        from tasks.build.gpu import derive_cuda_profile  # `cuda-sm_86`: the cuda profile with that arch

        derived = derive_cuda_profile(name, fleet)
        if derived is not None:
            return derived
        raise TvmflowError(
            f"unknown device {name!r}; known devices: {', '.join(sorted(fleet))} (add it to deployments/devices.yaml)"
        )
    return fleet[name]
