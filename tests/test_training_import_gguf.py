"""training.import_gguf: a GGUF written here (gguf.GGUFWriter, the way llama.cpp's converter
lays out a Llama/Qwen2) comes back as a Hugging Face directory with the same logits and
tokenizer, loads in transformers and vLLM, and bad input gives one error line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from safetensors import safe_open  # noqa: E402
from tiny_models import write_tokenizer  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from training import import_gguf  # noqa: E402
from training.cli import run_cli  # noqa: E402
from training.models import check_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QT = gguf.GGMLQuantizationType
IDS = torch.tensor([[0, 5, 100, 37, 300, 2, 511, 260, 261, 17]])
TEXT = "def foo(x):\n    return x + 1  # héllo ✓</s>"
ALLOWED = "a GGUF model file of architecture llama or qwen2"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tokenizer"
    write_tokenizer(out)
    return out


# A sentencepiece vocabulary ("llama" in llama.cpp's terms, as in Llama 2 files): unknown,
# control and byte-fallback tokens, then pieces whose scores give the merge order.
SP_WORDS = ["▁", *"abcdefghijklmnopqrstuvwxyz(){}:#+=1", "▁t", "he", "▁the", "▁a", "in",
            "▁in", "er", "on", "▁w", "▁o", "or", "ld", "▁wor", "▁world", "ll", "▁he", "▁hell",
            "▁hello", "re", "▁re", "ur", "▁return", "▁f", "oo", "▁foo", "▁x"]
SP_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SP_WORDS]
TT = gguf.TokenType
SP_TYPES = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL, *[TT.BYTE] * 256, *[TT.NORMAL] * len(SP_WORDS)]
SP_SCORES = [0.0] * (3 + 256) + [-float(i) for i in range(len(SP_WORDS))]


def build_model(arch: str, tie: bool, init_std: float = 0.02, seed: int = 0,
                vocab_size: int = 512):
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=0,
                        eos_token_id=1, initializer_range=init_std)
    return model_cls(config).eval()


def rope_permute(weight, n_head: int):
    """llama.cpp's converter stores q/k rows of each head interleaved (its rotary pairs
    adjacent dimensions, transformers pairs the two halves); the importer undoes this."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def add_bpe_tokenizer(writer, tok_dir: Path, pre: str) -> None:
    """Byte-level BPE ("gpt2" in llama.cpp's terms): tokens in id order, merges as "a b"."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab, special = spec["model"]["vocab"], {t["content"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_add_bos_token(False)


def add_sentencepiece_tokenizer(writer) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(SP_TOKENS)
    writer.add_token_types(SP_TYPES)
    writer.add_token_scores(SP_SCORES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)  # llama.cpp prepends <s>; the import must too


def write_gguf(path: Path, model, tok_dir: Path, qtype=QT.F32, architecture: str | None = None,
               skip: tuple[str, ...] = (), pre: str | None = None, rope_freqs: bool = False,
               sentencepiece: bool = False) -> Path:
    """The model and tokenizer as a GGUF file. Matrices in `qtype`, norms and biases F32 (as
    llama.cpp does); `architecture` overrides general.architecture, `skip` drops tensors,
    `pre` is llama.cpp's pre-tokenizer name (default: the architecture's own), `rope_freqs`
    adds Llama 3.1-style rope frequency factors, `sentencepiece` writes SP_TOKENS instead
    of the byte-level BPE of tok_dir."""
    config = model.config
    arch = config.model_type
    writer = gguf.GGUFWriter(str(path), architecture or arch)
    writer.add_name("tiny-test")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if sentencepiece:
        add_sentencepiece_tokenizer(writer)
    else:
        add_bpe_tokenizer(writer, tok_dir, pre or {"qwen2": "qwen2"}.get(arch, "default"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name in skip:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = rope_permute(data, config.num_attention_heads)
        if arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = rope_permute(data, config.num_key_value_heads)
        if data.ndim == 1:
            writer.add_tensor(name, data)
        else:
            packed = gguf.quants.quantize(data, qtype)
            raw_dtype = None if qtype in (QT.F32, QT.F16) else qtype  # bytes of blocks
            writer.add_tensor(name, packed, raw_dtype=raw_dtype)
    if rope_freqs:
        head_dim = config.hidden_size // config.num_attention_heads
        writer.add_tensor("rope_freqs.weight", np.linspace(1, 8, head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cli(argv, capsys) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr)."""
    try:
        run_cli(lambda: import_gguf.main(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("arch, tie, qtype, dtype, atol, sentencepiece", [
    ("llama", True, QT.F32, "float32", 1e-5, False),  # lossless: proves the q/k un-permutation
    ("llama", True, QT.F16, "bfloat16", 1e-2, False),  # the default output dtype
    ("qwen2", False, QT.F16, "float32", 1e-2, False),  # q/k/v biases, untied lm_head
    ("llama", False, QT.Q8_0, "float32", 3e-2, False),  # dequantized blocks
    ("llama", True, QT.F16, "float32", 1e-2, True),  # sentencepiece tokenizer, as Llama 2
])
def test_round_trip_reproduces_model_and_tokenizer(tmp_path, tok_dir, capsys, arch, tie, qtype,
                                                   dtype, atol, sentencepiece):
    source = build_model(arch, tie, vocab_size=len(SP_TOKENS) if sentencepiece else 512)
    ids_in = IDS.clamp(max=source.config.vocab_size - 1)
    with torch.no_grad():
        expected = source(ids_in).logits
    path = write_gguf(tmp_path / f"{arch}.{qtype.name}.gguf", source, tok_dir, qtype,
                      sentencepiece=sentencepiece)
    out = tmp_path / "hf"
    code, err = cli(["--gguf", str(path), "--output", str(out), "--dtype", dtype], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert leftovers(tmp_path) == []

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(source).__name__]
    assert config["tie_word_embeddings"] is tie and "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == import_gguf.DTYPES[dtype]
    assert ("lm_head.weight" in stored) is not tie  # tied embeddings stored once
    check_model_dir(str(out))  # what training.finetune accepts as --model

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model) is type(source)
    with torch.no_grad():
        got = model(ids_in).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)

    # The tokenizer transformers reads from the GGUF is the one saved ...
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    imported = AutoTokenizer.from_pretrained(out)
    ids = from_gguf(TEXT)["input_ids"]
    assert (imported.bos_token, imported.eos_token) == ("<s>", "</s>")
    eos = imported.eos_token_id
    if sentencepiece:  # add_bos_token, which transformers' GGUF reader ignores, is honoured
        assert imported(TEXT)["input_ids"] == [imported.bos_token_id, *ids]
        assert imported.decode(ids, skip_special_tokens=True) == TEXT.removesuffix("</s>")
        return
    assert imported(TEXT)["input_ids"] == ids and ids[-1] == eos  # "</s>" stays whole
    assert imported.decode(ids) == TEXT
    if arch == "llama":  # ... and with GPT-2's split (pre "default") it is the original one.
        assert AutoTokenizer.from_pretrained(tok_dir)(TEXT)["input_ids"] == ids


def test_qwen2_file_with_another_tokenizer_is_refused(tmp_path, tok_dir, capsys):
    # transformers loads every qwen2 directory with Qwen2's own split regex, so a file whose
    # tokenizer splits otherwise would silently tokenize differently after the import.
    path = write_gguf(tmp_path / "q.gguf", build_model("qwen2", False), tok_dir, pre="default")
    code, err = cli(["--gguf", str(path), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.splitlines()[-1].startswith(
        f"error: --gguf: {path}: transformers would load the imported tokenizer as Qwen2Tokenizer")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overwrite_and_non_empty_output(tmp_path, tok_dir, capsys):
    path = write_gguf(tmp_path / "m.gguf", build_model("llama", True), tok_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = cli(["--gguf", str(path), "--output", str(out)], capsys)
    assert code == 2
    assert err == f"error: --output: {out} is not empty; pass --overwrite to replace it\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite must not delete the file it imports.
    code, err = cli(["--gguf", str(path), "--output", str(tmp_path), "--overwrite"], capsys)
    assert code == 2 and "holds the --gguf file" in err and path.is_file()
    code, err = cli(["--gguf", str(path), "--output", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_failed_import_leaves_no_output(tmp_path, tok_dir, capsys):
    path = write_gguf(tmp_path / "m.gguf", build_model("llama", True), tok_dir,
                      skip=("blk.1.ffn_down.weight",))
    code, err = cli(["--gguf", str(path), "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.splitlines()[-1] == (f"error: --gguf: {path} lacks the tensor for "
                                    f"model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _not_gguf(tmp_path, tok_dir):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file\n")
    return path, f"is not a GGUF file (it does not start with the bytes 'GGUF'; expected {ALLOWED})"


def _missing(tmp_path, tok_dir):
    return tmp_path / "nope.gguf", f"does not exist (expected {ALLOWED})"


def _falcon(tmp_path, tok_dir):
    path = write_gguf(tmp_path / "falcon.gguf", build_model("llama", True), tok_dir,
                      architecture="falcon")
    return path, "has unsupported architecture 'falcon' (supported: llama, qwen2)"


def _truncated(tmp_path, tok_dir):
    whole = write_gguf(tmp_path / "whole.gguf", build_model("llama", True), tok_dir)
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole.read_bytes()[:100])
    return path, "is truncated or corrupt, not a readable GGUF file"


def _rope_freqs(tmp_path, tok_dir):
    path = write_gguf(tmp_path / "llama31.gguf", build_model("llama", True), tok_dir,
                      rope_freqs=True)
    return path, ("uses rope frequency factors (tensor rope_freqs.weight, Llama 3.1+ rope "
                  "scaling), which transformers' GGUF reader drops; the imported model would "
                  "not match the file")


@pytest.mark.parametrize("make", [_not_gguf, _missing, _falcon, _truncated, _rope_freqs])
def test_bad_input_gives_one_error_line(tmp_path, tok_dir, capsys, make):
    path, message = make(tmp_path, tok_dir)
    out = tmp_path / "out"
    code, err = cli(["--gguf", str(path), "--output", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: --gguf: {path} {message}")
    assert err.count("\n") == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_command_line_entry_point(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    proc = subprocess.run([sys.executable, "-m", "training.import_gguf", "--gguf", str(path),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: --gguf: {path} is not a GGUF file")


PROMPTS = [[10, 200, 37], [45, 99, 120, 7, 300, 41, 52, 66], list(range(3, 120, 3)), [5] * 20]


@pytest.mark.engine
@pytest.mark.slow
def test_imported_model_runs_in_vllm_with_layerskip(tmp_path, tok_dir, capsys):
    from conftest import layerskip, open_engine, spec_counters
    from vllm import SamplingParams

    # Wide init: peaked next-token distributions, so greedy margins dwarf float32 rounding.
    source = build_model("llama", tie=True, init_std=0.6, seed=3)
    path = write_gguf(tmp_path / "m.gguf", source, tok_dir, QT.F16)
    out = tmp_path / "hf"
    assert cli(["--gguf", str(path), "--output", str(out)], capsys)[0] == 0

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def greedy(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    small = dict(max_model_len=256, kv_cache_memory_bytes=16 << 20)
    with open_engine(out, **small) as plain:
        expected = greedy(plain)
    spec_config = layerskip(exit_layer=1, draft_len=2)
    with open_engine(out, speculative_config=spec_config, **small) as spec:
        got = greedy(spec)
        counters = spec_counters(spec)
    assert got == expected
    assert counters["num_draft_tokens"] > 0  # the early-exit drafts really ran
    # vLLM reads the (tied) weights as transformers does: same greedy tokens.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for prompt, tokens in zip(PROMPTS, expected):
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                             do_sample=False)
        assert gen[0, len(prompt):].tolist() == tokens
