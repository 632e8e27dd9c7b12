"""platform_kernels: in a compiled engine vLLM binds custom ops to their PyTorch-native
bodies; the draft's eager layer calls get the platform kernels for their duration only."""
import itertools

import torch
from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
from vllm.config.vllm import get_cached_compilation_config
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_layerskip._vllm import platform_kernels


_fresh = itertools.count(64)  # get_rope caches instances by shape: a new shape each time


def build(custom_ops):
    config = VllmConfig(compilation_config=CompilationConfig(custom_ops=custom_ops))
    get_cached_compilation_config.cache_clear()  # custom ops read it once per process
    with set_current_vllm_config(config):
        block = torch.nn.ModuleDict({
            "rope": get_rope(32, next(_fresh), rope_parameters={"rope_theta": 10000.0}, dtype=torch.float32),
            "act": SiluAndMul(),
        })
    return config, block


def rope_out(rope):
    torch.manual_seed(0)
    positions = torch.arange(5)
    q, k = torch.randn(5, 64), torch.randn(5, 64)
    return rope(positions, q.clone(), k.clone())


def test_binds_platform_kernels_inside_and_restores_outside():
    config, block = build(["none"])
    rope = block["rope"]
    native = rope._forward_method
    assert native != rope.forward_cpu  # what a compiled engine binds
    want = rope_out(rope)
    kernels = platform_kernels(block, config)
    assert len(kernels) >= 2  # rope (and its inner rotary op) and the activation
    with kernels:
        assert rope._forward_method == rope.forward_cpu
        got = rope_out(rope)
    assert rope._forward_method == native
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with kernels:  # reusable
        assert block["act"]._forward_method == block["act"].forward_cpu
    assert block["act"]._forward_method != block["act"].forward_cpu


def test_leaves_eager_engines_and_disabled_ops_alone():
    config, block = build(["all"])
    assert len(platform_kernels(block, config)) == 0
    config, block = build(["none", "-rotary_embedding"])
    kernels = platform_kernels(block, config)
    with kernels:
        assert block["rope"]._forward_method != block["rope"].forward_cpu
