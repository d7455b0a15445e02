"""The android-arm64 profile: an LLVM aarch64-linux-android build linked by the NDK clang that
ANDROID_NDK_HOME / TVM_NDK_CC name, and a one-line error naming them when neither is set.

No NDK is installable from the package registries, so the stand-in "NDK clang" is Debian's
aarch64-linux-gnu-gcc (scripts/setup.sh) laid out as an NDK: it links the same LLVM-generated aarch64
objects into a shared library. Nothing runs on a phone here."""

from __future__ import annotations

import os
import shutil

import pytest

from tasks.devices.profiles import get_device
from tasks.errors import TvmflowError

EM_AARCH64 = 183
STAND_IN = shutil.which("aarch64-linux-gnu-gcc")


def _fake_ndk(root):
    bin_dir = root / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "aarch64-linux-android24-clang").symlink_to(STAND_IN)
    return root


def test_without_the_ndk_the_error_names_the_variables(monkeypatch):
    for name in ("TVM_NDK_CC", "ANDROID_NDK_HOME", "ANDROID_NDK_ROOT"):
        monkeypatch.delenv(name, raising=False)
    android = get_device("android-arm64")
    assert android.target["mtriple"] == "aarch64-linux-android" and not android.runs_on_host()
    with pytest.raises(TvmflowError, match="set ANDROID_NDK_HOME .* TVM_NDK_CC") as info:
        android.export_compiler()
    assert "\n" not in str(info.value)
    monkeypatch.setenv("ANDROID_NDK_HOME", "/nonexistent/ndk")
    with pytest.raises(TvmflowError, match="has no toolchains/llvm/prebuilt/\\*/bin/aarch64-linux-android24-clang"):
        android.export_compiler()


@pytest.mark.parametrize("variable", ["ANDROID_NDK_HOME", "TVM_NDK_CC"])
def test_android_build_cross_compiles_an_aarch64_library(mnist_pt2, tmp_path, monkeypatch, variable):
    from tasks.build.compile import build_library
    from tasks.importers.model_import import import_pt2
    from tasks.tuning.extract import prepare_for_tuning

    assert STAND_IN, "aarch64-linux-gnu-gcc is missing: run scripts/setup.sh"
    for name in ("TVM_NDK_CC", "ANDROID_NDK_HOME", "ANDROID_NDK_ROOT"):
        monkeypatch.delenv(name, raising=False)
    ndk = _fake_ndk(tmp_path / "ndk")
    monkeypatch.setenv(variable, str(ndk) if variable == "ANDROID_NDK_HOME" else STAND_IN)
    android = get_device("android-arm64")
    prepared = prepare_for_tuning(import_pt2(mnist_pt2).mod, android.tvm_target())
    lib = build_library(prepared, android, None, tmp_path / "mnist_android.so")
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[16] == 3  # ET_DYN: a shared library
    assert int.from_bytes(head[18:20], "little") == EM_AARCH64
    assert os.path.getsize(lib) > 10_000


def test_compiler_command_for_tuning_builders(tmp_path, monkeypatch):
    """Tuning builders take a compiler command: the NDK clang resolved from ANDROID_NDK_HOME."""
    assert STAND_IN, "aarch64-linux-gnu-gcc is missing: run scripts/setup.sh"
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    monkeypatch.setenv("ANDROID_NDK_HOME", str(_fake_ndk(tmp_path / "ndk")))
    command = get_device("android-arm64").compiler_command()
    assert command.endswith("bin/aarch64-linux-android24-clang") and os.path.exists(command)
    assert get_device("aarch64-linux").compiler_command() == "aarch64-linux-gnu-gcc"
    assert get_device("local").compiler_command() is None
