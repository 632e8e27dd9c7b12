"""Layer dropout really skips compute, per sample, through the transformers layers."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from training.layerskip_model import LayerSkipLM


def tiny(arch="llama", layers=4):
    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    return model.train()


def count_rows(model):
    """Rows (samples) each decoder layer's MLP processed, via forward hooks."""
    rows = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda m, inp, out, i=i: rows.__setitem__(i, rows[i] + inp[0].shape[0]))
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dropped_layers_skip_compute(arch):
    model = tiny(arch)
    rows = count_rows(model)
    calls = [0] * 4  # attention calls: a layer's compute, not just its (cheap) wrapper
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    skipper = LayerSkipLM(model)
    ids = torch.randint(0, 128, (4, 16))
    keep = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    loss = skipper(ids, keep, [0.0, 0.5, 0.0, 0.5])
    loss.backward()
    assert rows == [4, 2, 0, 3]     # only kept samples ran through each layer
    assert calls == [1, 1, 0, 1]    # a layer dropped by every sample is never called
    assert torch.isfinite(loss)


def test_dropped_sample_passes_through_and_kept_sample_is_exact():
    model = tiny()
    skipper = LayerSkipLM(model)
    ids = torch.randint(0, 128, (2, 16))
    keep = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)  # sample 1 skips layer 1
    captured = {}
    model.model.layers[3].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    with skipper.dropout.active(keep):
        model.model(input_ids=ids, use_cache=False)
    h_drop = captured.pop("h")
    model.model(input_ids=ids, use_cache=False)  # no dropout
    h_full = captured.pop("h")
    assert torch.allclose(h_drop[0], h_full[0], atol=1e-5)  # sample 0 kept every layer
    assert not torch.allclose(h_drop[1], h_full[1], atol=1e-3)
    # Reference for sample 1: run the layers by hand, skipping layer 1.
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], layers[2], layers[3]])
    model.config.num_hidden_layers = 3
    model.model(input_ids=ids[1:], use_cache=False)
    assert torch.allclose(captured["h"][0], h_drop[1], atol=1e-5)


def test_no_dropout_in_eval_and_full_keep_is_identity():
    model = tiny()
    skipper = LayerSkipLM(model)
    rows = count_rows(model)
    ids = torch.randint(0, 128, (3, 8))
    keep = torch.zeros(4, 3, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        skipper(ids, keep, [0, 0, 0, 1.0])
    assert rows == [3, 3, 3, 3]
    model.train()
    with torch.no_grad():
        a = skipper(ids, torch.ones(4, 3, dtype=torch.bool), [0, 0, 0, 1.0])
        b = skipper(ids, None, [0, 0, 0, 1.0])
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [0, 4])
def test_early_exit_loss_only_for_enabled_exits(chunk, monkeypatch):
    import training.early_exit_loss as eel
    model = tiny()
    skipper = LayerSkipLM(model, loss_chunk=chunk)
    heads = []  # LM-head read-outs: the head module unchunked, the fused linear + CE chunked
    model.lm_head.register_forward_hook(lambda m, i, o: heads.append(1))
    fused = eel.linear_cross_entropy
    monkeypatch.setattr(eel, "linear_cross_entropy",
                        lambda *a, **k: heads.append(1) or fused(*a, **k))
    ids = torch.randint(0, 128, (2, 8))
    loss = skipper(ids, None, [0.0, 0.25, 0.0, 0.75])
    assert len(heads) == 2 and sorted(skipper.last_exit_losses) == [1, 3]
    manual = 0.25 * skipper.last_exit_losses[1] + 0.75 * skipper.last_exit_losses[3]
    assert loss.item() == pytest.approx(manual, rel=1e-5)


def test_fsdp_mode_calls_fully_dropped_layer_with_zero_weight():
    model = tiny()
    rows = count_rows(model)
    skipper = LayerSkipLM(model, always_call_layers=True)
    ids = torch.randint(0, 128, (2, 8))
    keep = torch.tensor([[1, 1], [0, 0], [1, 1], [1, 1]], dtype=torch.bool)
    loss = skipper(ids, keep, [0, 0, 0, 1.0])
    loss.backward()
    assert rows == [2, 1, 2, 2]  # layer 1 ran on one row, for the collectives only
    grad = model.model.layers[1].mlp.down_proj.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    with torch.no_grad():
        ref = LayerSkipLM(tiny(), always_call_layers=False)(ids, keep, [0, 0, 0, 1.0])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_compiled_layers_match_eager_under_changing_dropout():
    """--compile traces each decoder layer once with a symbolic batch: the kept-row subsets
    change size from step to step, and loss and gradients stay those of the eager layers."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny(layers=2)
    compiled = copy.deepcopy(eager)
    eager_lm, compiled_lm = LayerSkipLM(eager), LayerSkipLM(compiled, compile_layers=True)
    ids = torch.randint(0, 128, (4, 16))
    for keep in ([[1, 1, 1, 1], [1, 0, 1, 0]], [[1, 1, 0, 1], [0, 1, 1, 1]], [[1, 1, 1, 1], [1, 1, 1, 1]]):
        keep = torch.tensor(keep, dtype=torch.bool)
        losses = [lm(ids, keep, [0.5, 1.0]) for lm in (eager_lm, compiled_lm)]
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], atol=1e-5)
        for a, b in zip(eager.parameters(), compiled.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers ran as a graph (shared by both)
    # The module's state dict is the transformers model's, compiled or not.
    assert compiled.state_dict().keys() == eager.state_dict().keys()
