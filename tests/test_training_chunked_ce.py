"""The chunked LM-head cross entropy is the unchunked one: same loss, same gradients, so
the training speed-up leaves what the recipe computes unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from training.chunked_ce import linear_cross_entropy
from training.layerskip_model import LayerSkipLM
from training.layer_dropout import sample_keep_mask
from training.recipe import PRESETS, step_plan


def reference_ce(x, weight, y):
    return F.cross_entropy(F.linear(x, weight).float(), y)


@pytest.mark.parametrize("chunk,compiled", [(1, False), (7, False), (64, False), (1000, False),
                                            (7, True), (1000, True)])
def test_linear_ce_matches_unchunked_fp32(chunk, compiled):
    torch.manual_seed(0)
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (50,))
    ref = reference_ce(x, w, y) * 0.7
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    out = linear_cross_entropy(x, w, y, chunk, compiled=compiled) * 0.7
    gx, gw = torch.autograd.grad(out, (x, w))
    # float64 throughout apart from the float32 softmax both paths share
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_ce_matches_unchunked_under_bf16_autocast(compiled):
    torch.manual_seed(1)
    x = torch.randn(96, 32, requires_grad=True)
    w = torch.randn(500, 32, requires_grad=True)
    y = torch.randint(0, 500, (96,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_ce(x, w, y)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(x, w, y, 40, compiled=compiled)
    gx, gw = torch.autograd.grad(out, (x, w))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 CE
    # bf16 gradients: the unchunked path rounds dloss/dW once to bf16, ours sums in fp32
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_ce_detects_a_wrong_target(compiled):
    """The comparison has power: a shifted target gives a different loss and gradient."""
    torch.manual_seed(2)
    x, w = torch.randn(20, 8, requires_grad=True), torch.randn(50, 8)
    y = torch.randint(0, 50, (20,))
    wrong = linear_cross_entropy(x, w, (y + 1) % 50, 8, compiled=compiled)
    ref = reference_ce(x, w, y)
    assert not torch.allclose(wrong, ref)
    assert not torch.allclose(torch.autograd.grad(wrong, x)[0], torch.autograd.grad(ref, x)[0])


def test_linear_ce_without_grad_keeps_nothing():
    x, w = torch.randn(10, 8), torch.randn(30, 8)
    y = torch.randint(0, 30, (10,))
    out = linear_cross_entropy(x, w, y, 3)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference_ce(x, w, y))


def tiny_llama(tie: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).train()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_layerskip_loss_and_grads_same_chunked_or_not(tie, bf16):
    """The recipe's full loss (layer dropout + weighted early exits, code-finetuning
    preset) and every parameter gradient agree between chunk sizes, the compiled chunks
    and the plain path."""
    base = tiny_llama(tie)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    plan = step_plan(PRESETS["code-finetuning"], 1, 10, 6)
    plan_exits = [l for l, w in enumerate(plan.exit_weights) if w > 0]
    assert len(plan_exits) >= 2  # early exits really take part
    keep = sample_keep_mask([0.3] * 6, 4, torch.Generator().manual_seed(4))
    results = []
    for chunk, compiled in ((0, False), (5, False), (2048, False), (5, True)):
        model = copy.deepcopy(base)
        skipper = LayerSkipLM(model, loss_chunk=chunk, compile_loss=compiled)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = skipper(ids, keep, plan.exit_weights)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.detach(), skipper.last_exit_losses, grads))
    (loss0, exits0, grads0) = results[0]
    for loss, exits, grads in results[1:]:
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-5)
        assert exits.keys() == exits0.keys()
        for layer in exits:
            assert exits[layer] == pytest.approx(exits0[layer], rel=1e-5)
        for name, g in grads.items():
            if bf16:  # bf16 matmul gradients: compare as vectors, relative error of the norm
                err = (g - grads0[name]).norm() / grads0[name].norm()
                assert err < 2e-2, (name, float(err))
            else:
                torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, name=name: f"{name}: {m}")


def test_fused_adamw_takes_the_plain_step():
    """The trainer's fused AdamW makes the same update as the per-tensor one."""
    from training.trainer import make_optimizer
    torch.manual_seed(5)
    start = [torch.randn(7, 3), torch.randn(11)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    finals = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make_optimizer(params, lr=1e-2, weight_decay=0.1, fused=fused)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for first, plain, fused in zip(start, *finals):
        assert (plain - first).norm() > 1e-2  # the steps really moved the parameters
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
