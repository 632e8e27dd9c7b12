"""What the machine computes natively, for the trainer's autocast and the benchmarks' dtype."""
from __future__ import annotations

import torch


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether `device` (default: the GPU if there is one, else the CPU) computes in bfloat16
    rather than emulating it: a GPU that supports it, or a CPU with AVX512_BF16 or AMX.
    Without those a CPU converts bf16 operands on the fly, slower than float32."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
