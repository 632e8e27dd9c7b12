"""training.export: small bf16 shards that load back to the same model, metadata kept, and
nothing half-written when it fails."""
import json
import os

import pytest
import torch
from benchmarks.tiny_model import build_tiny_model

from training.errors import ConfigError
from training.export import export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("export") / "src", layers=4, hidden=128,
                            vocab_size=2048)


def test_shards_load_back_to_the_same_bf16_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(trained, tmp_path / "shipped", max_shard_mib=1)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    assert all(p.stat().st_size <= 1.05 * (1 << 20) for p in shards)
    meta = json.loads((trained / "config.json").read_text())["layerskip"]
    assert json.loads((out / "config.json").read_text())["layerskip"] == meta
    assert (out / "tokenizer.json").is_file()
    # Readable by everyone the umask allows (not mkdtemp's owner-only 0700).
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())
    want = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.bfloat16)
    have = AutoModelForCausalLM.from_pretrained(out)
    assert have.dtype == torch.bfloat16
    ids = torch.arange(12).view(1, -1)
    assert torch.equal(want(ids).logits, have(ids).logits)


def test_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export(trained, tmp_path / "shipped")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_named(trained, tmp_path):
    with pytest.raises(ConfigError, match="--model: .* has no config.json"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="--output: .* exists"):
        export(trained, tmp_path / "taken")
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        export(trained, tmp_path / "out2", dtype="int3")
