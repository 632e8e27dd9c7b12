"""all_reduce_mean reduces a tensor on the process's device (NCCL takes CUDA tensors only)."""
import pytest
import torch

from training import distributed
from training.distributed import DistEnv, all_reduce_mean


class Reduced(Exception):
    """Raised by the fake all_reduce once it has seen the tensor (a meta tensor has no
    value to return)."""


def test_all_reduce_tensor_lives_on_env_device(monkeypatch):
    seen = []

    def fake_all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise Reduced

    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    # Any device but the CPU default shows where the tensor was made; meta needs no GPU.
    with pytest.raises(Reduced):
        all_reduce_mean(1.5, DistEnv(rank=0, world_size=2, device=torch.device("meta")))
    assert seen == [torch.device("meta")]


def test_all_reduce_mean_divides_the_sum(monkeypatch):
    def fake_all_reduce(t, *args, **kwargs):
        t += 4.5 + 2.0  # the other two ranks' values

    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    assert all_reduce_mean(1.5, DistEnv(rank=1, world_size=3)) == pytest.approx(8.0 / 3)
    assert all_reduce_mean(1.5, DistEnv(world_size=1)) == 1.5  # single process: no collective
