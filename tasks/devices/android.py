"""The Android NDK's clang as the cross compiler of `cross_compiler: android-ndk` profiles.

As tvm.support.ndk does: TVM_NDK_CC names the compiler; or ANDROID_NDK_HOME (ANDROID_NDK_ROOT) names
the NDK, whose `toolchains/llvm/prebuilt/<host>/bin/aarch64-linux-android<API>-clang` is used.
Without either, one line says which variable to set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tasks.errors import TvmflowError

MARKER = "android-ndk"  # the fleet file's cross_compiler value for NDK devices
DEFAULT_API = 24


def ndk_compiler(api: int = DEFAULT_API, triple: str = "aarch64-linux-android") -> str:
    """The path of the NDK clang for `triple` and Android API level `api`."""
    given = os.environ.get("TVM_NDK_CC")
    if given:
        found = shutil.which(given)
        if not found:
            raise TvmflowError(
                f"TVM_NDK_CC={given} is not an executable compiler; point it at the NDK's {triple}{api}-clang"
            )
        return found
    home = os.environ.get("ANDROID_NDK_HOME") or os.environ.get("ANDROID_NDK_ROOT")
    if not home:
        raise TvmflowError(
            f"android builds need the Android NDK: set ANDROID_NDK_HOME to the NDK folder "
            f"(or TVM_NDK_CC to its {triple}{api}-clang)"
        )
    candidates = sorted(Path(home).glob(f"toolchains/llvm/prebuilt/*/bin/{triple}{api}-clang"))
    if not candidates:
        raise TvmflowError(
            f"ANDROID_NDK_HOME={home} has no toolchains/llvm/prebuilt/*/bin/{triple}{api}-clang; "
            "point it at an NDK r19 or newer (or set TVM_NDK_CC)"
        )
    return str(candidates[0])


def ndk_fcompile(api: int = DEFAULT_API, triple: str = "aarch64-linux-android"):
    """export_library's fcompile: the NDK clang linking a shared library (-shared -fPIC -lm, as ndk.create_shared)."""
    from tvm.support import cc

    return cc.cross_compiler(ndk_compiler(api, triple), options=["-lm"])
