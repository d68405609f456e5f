"""--stage-devices: parsing, checks, the memory split among stages sharing a device, and the
choice of decode attention per head size (pure parts; the GPU cases are in
tests/test_triton_decode.py)."""
import pytest
import torch

from pipemax import devices
from pipemax.config import ConfigError, from_args
from pipemax.launch import main
from pipemax.stages import triton_decode
from pipemax.stages.attention import decode_path

GiB = 1 << 30


def test_parse():
    assert devices.parse_stage_devices("0,0,1") == (0, 0, 1)
    assert devices.parse_stage_devices(" 2, 3 ") == (2, 3)
    for bad in ("0,x", "0,-1", "", "1.5", "0,,1"):
        with pytest.raises(devices.DeviceListError, match="not a device id"):
            devices.parse_stage_devices(bad)


def test_resolve_and_present():
    assert devices.resolve(3, None) == (0, 1, 2)
    assert devices.resolve(3, (0, 0, 0)) == (0, 0, 0)
    with pytest.raises(devices.DeviceListError, match="lists 2 devices for 3 stages"):
        devices.resolve(3, (0, 0))
    devices.check_present((0, 0, 1), 2)
    with pytest.raises(devices.DeviceListError, match="names cuda:3 but only 2"):
        devices.check_present((0, 3, 1), 2)


def test_sharers():
    assert devices.sharers((0, 1, 2)) == (1, 1, 1)
    assert devices.sharers((0, 0, 1, 0)) == (3, 3, 1, 3)


def test_caps_must_fit_the_device():
    totals = {0: 80 * GiB, 1: 24 * GiB}
    devices.check_caps((0, 0, 0), 26.0, totals)              # 78 of 80
    devices.check_caps((0, 0), None, totals)                  # no caps: shares, always fit
    with pytest.raises(devices.DeviceListError) as e:
        devices.check_caps((0, 0, 0, 1), 27.0, totals)
    msg = str(e.value)
    assert "3 stage(s) on cuda:0" in msg and "81.0 GiB" in msg and "80.0 GiB" in msg
    with pytest.raises(devices.DeviceListError, match="on cuda:1"):
        devices.check_caps((0, 1), 25.0, totals)


def test_memory_split():
    total = 140 * GiB
    # alone, or one share in k of what was free
    assert devices.stage_memory_cap(total, total, 1, None) == total
    assert devices.stage_memory_cap(total, total, 4, None) == total // 4
    assert devices.stage_memory_cap(total, 100 * GiB, 2, None) == 50 * GiB
    # the caps of k stages never add up to more than was free
    for k in range(1, 9):
        for free in (total, 77 * GiB, 3 * GiB):
            assert k * devices.stage_memory_cap(total, free, k, None) <= free
    # an explicit cap wins (its sum was checked against the device at start)
    assert devices.stage_memory_cap(total, total, 4, 24.0) == 24 * GiB


def test_flags():
    with pytest.raises(ConfigError, match="lists 1 devices for 2 stages"):
        from_args(["--device", "cuda", "--gpus", "2", "--stage-devices", "0"])
    with pytest.raises(ConfigError, match="not a device id"):
        from_args(["--device", "cuda", "--stage-devices", "zero"])
    with pytest.raises(ConfigError, match="needs --device cuda"):
        from_args(["--device", "cpu", "--stage-devices", "0"])
    cfg = from_args(["--device", "cuda", "--gpus", "3", "--stage-devices", "0,0,1"])
    assert cfg.stage_device_ids == (0, 0, 1)
    assert from_args(["--device", "cuda", "--gpus", "2"]).stage_device_ids == (0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a machine without CUDA")
def test_missing_device_is_one_line(capsys):
    assert main(["--device", "cuda", "--gpus", "2", "--stage-devices", "0,0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names cuda:0 but only 0 CUDA device(s)" in err[0], err


def test_bad_list_is_one_line(capsys):
    assert main(["--device", "cuda", "--gpus", "2", "--stage-devices", "0,a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipemax: error: --stage-devices"), err


def test_kernel_rule():
    cuda = torch.device("cuda")
    if not triton_decode.available(cuda):
        assert triton_decode.unsupported(64, 16, torch.bfloat16, cuda) == \
            "no compiled Triton on this device"
    assert triton_decode.unsupported(64, 16, torch.bfloat16, "cpu") == \
        "no compiled Triton on this device"
    assert triton_decode._d_pad(8) == 16 and triton_decode._d_pad(80) == 128
    assert triton_decode._d_pad(256) == 256


def test_kernel_rule_shapes(monkeypatch):
    """The shape rules, as on a device with a compiled Triton."""
    monkeypatch.setattr(triton_decode, "available", lambda device: True)
    ok = triton_decode.unsupported
    for D in (8, 16, 64, 80, 96, 128, 256):
        assert ok(D, 16, torch.bfloat16, "cuda") is None
    assert "over the kernel's 256" in ok(512, 16, torch.bfloat16, "cuda")
    assert "not a power of two" in ok(64, 12, torch.bfloat16, "cuda")
    assert "no torch.int8 path" in ok(64, 16, torch.int8, "cuda")


def test_decode_path_on_cpu():
    kernel, why = decode_path(8, 2, 8, 16, torch.float32, torch.device("cpu"))
    assert kernel is False and why == "torch (no compiled Triton on this device)"


def test_probe_falls_back_when_the_kernel_fails(monkeypatch):
    """A kernel that fails to build at a shape (e.g. shared memory) or disagrees with the torch
    path leaves the stage on the torch path, saying why."""
    from pipemax.stages import attention
    monkeypatch.setattr(triton_decode, "unsupported", lambda *a: None)

    def fails(*a, **k):
        raise RuntimeError("out of resource: shared memory")
    monkeypatch.setattr(triton_decode, "paged_decode", fails)
    kernel, why = attention.decode_path(4, 2, 256, 16, torch.float32, torch.device("cpu"))
    assert not kernel and why == "torch (the Triton kernel fails at head_dim 256: RuntimeError)"

    monkeypatch.setattr(triton_decode, "paged_decode",
                        lambda q, kv, layer, table, ctx, scale, max_ctx: torch.zeros(
                            q.shape[0], q.shape[1] * q.shape[2]) + 1.0)
    kernel, why = attention.decode_path(4, 2, 64, 16, torch.float32, torch.device("cpu"))
    assert not kernel and why.startswith("torch (the Triton kernel is off by")

    monkeypatch.setattr(triton_decode, "paged_decode",
                        lambda q, kv, layer, table, ctx, scale, max_ctx:
                        attention.paged_decode_torch(q, kv, layer, table, ctx, scale, max_ctx))
    assert attention.decode_path(4, 2, 64, 16, torch.float32, torch.device("cpu")) == \
        (True, "triton kernel")
