"""Validation runs a build on the RPC session's device of the build's kind: the GPU for OpenCL,
Vulkan, CUDA (no OpenCL/Vulkan runtime here, so the choice is checked, not a run on it)."""

from __future__ import annotations

from tvm import rpc

from tasks.devices.validate import session_device


def test_each_target_kind_gets_that_device_of_a_real_rpc_session(local_workers):
    session = rpc.connect_tracker(local_workers.host, local_workers.tracker_port).request("local", session_timeout=60)
    mask = lambda dev: dev.dlpack_device_type() % rpc.base.RPC_SESS_MASK  # the kind, without the session bits
    kinds = {kind: mask(session_device(session, kind)) for kind in ("llvm", "c", "cuda", "opencl", "vulkan", "webgpu")}
    assert kinds == {"llvm": 1, "c": 1, "cuda": 2, "opencl": 4, "vulkan": 7, "webgpu": 15}
    cpu = session_device(session, "llvm")
    assert cpu.dlpack_device_type() >= rpc.base.RPC_SESS_MASK and cpu.exist  # a remote device, and it is there
    assert not session_device(session, "opencl").exist  # the wheel's runtime has no OpenCL: nothing to run on here
