"""Device profiles: the fleet file, unknown devices, and the cross-compiled aarch64 profile."""

from __future__ import annotations

import struct

import pytest

from tasks.devices.profiles import get_device, load_fleet
from tasks.errors import TvmflowError

EM_AARCH64 = 183


def test_shipped_fleet_has_local_and_aarch64():
    fleet = load_fleet()
    local = fleet["local"]
    assert local.target["kind"] == "llvm" and local.target["mcpu"] not in ("host", "")
    assert isinstance(local.target["num-cores"], int) and local.local_workers >= 1
    arm = fleet["aarch64-linux"]
    assert arm.target["mtriple"] == "aarch64-linux-gnu" and arm.cross_compiler == "aarch64-linux-gnu-gcc"
    assert arm.local_workers == 0  # it cannot run here: only a real board may register for it
    assert arm.tvm_target().kind.name == "llvm"


def test_unknown_device_is_one_line_error():
    with pytest.raises(TvmflowError, match=r"unknown device 'rk9999'; known devices: .*aarch64-linux.*local") as info:
        get_device("rk9999")
    assert "\n" not in str(info.value)


def test_fleet_file_from_env(tmp_path, monkeypatch):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "devices:\n  board:\n    target: {kind: llvm, mcpu: host, num-cores: 1}\n"
        "    rpc_key: board\n    local_workers: 1\n    count: 3\n"
    )
    monkeypatch.setenv("TVMFLOW_FLEET", str(fleet))
    board = get_device("board")
    assert board.rpc_key == "board" and board.target["mcpu"] != "host" and board.extra == {"count": 3}
    with pytest.raises(TvmflowError, match="unknown device 'local'"):
        get_device("local")


def test_broken_fleet_file_is_one_line_error(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("devices: [unclosed\n")
    with pytest.raises(TvmflowError, match="cannot read the fleet file"):
        load_fleet(bad)
    with pytest.raises(TvmflowError, match="cannot read the fleet file"):
        load_fleet(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "entry",
    [
        "    rpc_key: b\n",
        "    target: llvm\n    rpc_key: b\n",
        "    target: {kind: llvm}\n",
        "    target: {kind: llvm}\n    rpc_key: b\n    no_such: 1\n    local_workers: x\n",
    ],
)
def test_incomplete_device_entry_is_one_line_error(tmp_path, entry):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("devices:\n  b:\n" + entry)
    if "no_such" in entry:  # unknown keys are kept as extras; a bad value type is the user's to fix
        assert get_device("b", fleet).extra == {"no_such": 1}
        return
    with pytest.raises(TvmflowError, match="bad device entry in the fleet file") as info:
        load_fleet(fleet)
    assert "\n" not in str(info.value)


def test_missing_cross_compiler_is_one_line_error(tmp_path, monkeypatch):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "devices:\n  odd:\n    target: {kind: llvm, mtriple: aarch64-linux-gnu}\n"
        "    rpc_key: odd\n    cross_compiler: no-such-gcc-xyz\n"
    )
    with pytest.raises(TvmflowError, match="cross compiler 'no-such-gcc-xyz'.*not installed"):
        get_device("odd", fleet).export_compiler()


def test_aarch64_profile_cross_compiles_mnist(tmp_path, mnist_pt2):
    """A real aarch64 ELF shared object, built with the Debian cross toolchain; never run here."""
    from tasks.build.compile import build_library
    from tasks.importers.model_import import import_pt2
    from tasks.tuning.extract import prepare_for_tuning

    arm = get_device("aarch64-linux")
    prepared = prepare_for_tuning(import_pt2(mnist_pt2).mod, arm.tvm_target())
    lib = build_library(prepared, arm, None, tmp_path / "out" / "mnist-aarch64.so")
    header = lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # ELF, 64-bit
    assert header[5] == 1  # little endian
    assert struct.unpack_from("<H", header, 16)[0] == 3  # ET_DYN: a shared object
    assert struct.unpack_from("<H", header, 18)[0] == EM_AARCH64


def test_aarch64_has_no_local_workers_and_says_so():
    from tasks.devices.session import DeviceSession

    with pytest.raises(TvmflowError, match="has no local workers: pass --tracker"):
        with DeviceSession(get_device("aarch64-linux"), None, 5) as session:
            session.start()
