"""training.corpus on a fake stdlib / site-packages tree (held-out split and its vendored
copies excluded, duplicates dropped, token file round trip and corruption), and
training.pretrain from the token directory (packing as --data, resume)."""
import json
import lzma
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.prompts import is_heldout
from training import corpus, pretrain
from training.cli import run_cli
from training.corpus_files import select_files
from training.data import pack, pack_stream
from training.errors import DataError
from training.token_corpus import TOKENS_FILE, load_token_corpus, read_tokens

TINY = ["--layers", "2", "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4",
        "--seed", "1", "--no-progress"]


def _source(name: str, n: int) -> str:
    """A distinct, plausible Python file of a few hundred bytes."""
    body = "".join(f"def {name}_{i}(x, y={i}):\n    return x * y + {i}  # step {i}\n\n" for i in range(n))
    return f'"""Module {name}."""\nimport os\n\n{body}'


def _names(heldout: bool, count: int) -> list[str]:
    out, i = [], 0
    while len(out) < count:
        if is_heldout(f"pkg/m{i}.py") == heldout:
            out.append(f"pkg/m{i}.py")
        i += 1
    return out


@pytest.fixture()
def tree(tmp_path) -> dict:
    """stdlib: 3 training files + 2 held-out ones + a stub, a generated file and the base
    interpreter's site-packages; site-packages: a duplicate of a training file, a vendored
    copy of a held-out file, and 2 files of its own."""
    std, site = tmp_path / "stdlib", tmp_path / "site"
    train_names, held_names = _names(False, 3), _names(True, 2)
    texts = {}
    for i, rel in enumerate(train_names + held_names):
        texts[rel] = _source(f"f{i}", 6 + i)
        (std / rel).parent.mkdir(parents=True, exist_ok=True)
        (std / rel).write_text(texts[rel])
    (std / "pkg/__init__.py").write_text("# stub\n")                    # under 200 bytes
    (std / "pkg/table.py").write_text("T = [" + "1, " * 1000 + "]\n")  # one 3,000-char line
    (std / "site-packages/extra").mkdir(parents=True)
    (std / "site-packages/extra/base.py").write_text(_source("base", 8))  # not ours: skipped
    (site / "lib/_vendor").mkdir(parents=True)
    (site / "lib/dup.py").write_text(texts[train_names[0]])
    (site / "lib/_vendor/copy.py").write_text(texts[held_names[0]])
    (site / "lib/own.py").write_text(_source("own", 9))
    (site / "lib/more.py").write_text(_source("more", 10))
    return {"std": std, "site": site, "texts": texts, "train": train_names, "held": held_names,
            "site_texts": [_source("own", 9), _source("more", 10)]}


def build(tree, out: Path, *extra) -> dict:
    run_cli(lambda: corpus.main(["--output", str(out), "--stdlib", str(tree["std"]),
                                 "--site-packages", str(tree["site"]), "--vocab-size", "300",
                                 "--no-progress", *extra]))
    return json.loads((out / "corpus.json").read_text())


def documents(stream: torch.Tensor, eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "the stream ends with EOS"
    return docs


def test_selection_excludes_heldout_and_vendored_copies(tree):
    sel = select_files(tree["std"], [tree["site"]])
    kept = {f.text for f in sel.files}
    assert kept == {tree["texts"][r] for r in tree["train"]} | set(tree["site_texts"])
    assert not kept & {tree["texts"][r] for r in tree["held"]}
    assert (sel.heldout_drops, sel.vendored_drops, sel.duplicate_drops, sel.filtered_drops) == (3, 1, 1, 2)
    assert all("site-packages/extra" not in str(f.path) for f in sel.files)


def test_corpus_round_trip(tree, tmp_path):
    out = tmp_path / "corpus"
    m = build(tree, out)
    assert (m["files"], m["files_stdlib"], m["files_site_packages"]) == (5, 3, 2)
    assert (m["heldout_drops"], m["heldout_vendored_drops"], m["duplicate_drops"]) == (3, 1, 1)
    tokenizer, stream = load_token_corpus(str(out))
    assert m["vocab_size"] == len(tokenizer) == 300 and m["tokens"] == len(stream)
    texts = [tokenizer.decode(d) for d in documents(stream, tokenizer.eos_token_id)]
    assert sorted(texts) == sorted([tree["texts"][r] for r in tree["train"]] + tree["site_texts"])
    # The stream cut into blocks, the same blocks --data packs from these documents in this order.
    blocks = pack_stream(stream, 32, "--tokens")  # [n, 32]
    assert torch.equal(blocks.flatten(), stream[: blocks.numel()].long())
    assert torch.equal(blocks, pack(texts, tokenizer, 32))


def test_max_tokens_keeps_whole_documents(tree, tmp_path):
    full = build(tree, tmp_path / "full")
    capped = build(tree, tmp_path / "capped", "--max-tokens", str(full["tokens"] // 2))
    assert 0 < capped["tokens"] <= full["tokens"] // 2 and capped["files"] < full["files"]
    tokenizer, stream = load_token_corpus(str(tmp_path / "capped"))
    assert len(documents(stream, tokenizer.eos_token_id)) == capped["files"]
    # One token short of everything: the last site-packages file goes, the stdlib stays whole.
    almost = build(tree, tmp_path / "almost", "--max-tokens", str(full["tokens"] - 1))
    assert (almost["files"], almost["files_stdlib"], almost["cap_drops"]) == (4, 3, 1)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / TOKENS_FILE).write_bytes((d / TOKENS_FILE).read_bytes()[:-10]), "is corrupt"),
    (lambda d: (d / TOKENS_FILE).unlink(), "is missing"),
    (lambda d: (d / "corpus.json").write_text("{"), "cannot read"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
])
def test_damaged_corpus_is_refused(tree, tmp_path, damage, message):
    out = tmp_path / "corpus"
    build(tree, out)
    damage(out)
    with pytest.raises(DataError, match=message) as exc:
        load_token_corpus(str(out))
    assert str(exc.value).startswith("--tokens: ")


def test_consistent_hash_of_wrong_content_is_refused(tree, tmp_path):
    """A file rewritten with other ids and a matching file hash still fails the id hash."""
    out = tmp_path / "corpus"
    m = build(tree, out)
    with lzma.open(out / TOKENS_FILE, "wb") as f:
        f.write(b"\x00\x00" * m["tokens"])
    from training.token_corpus import sha256_file
    m["tokens_file_sha256"] = sha256_file(out / TOKENS_FILE)
    (out / "corpus.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="does not hold"):
        read_tokens(out)


def cli(argv, capsys):
    try:
        run_cli(lambda: pretrain.main(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_pretrain_from_tokens_resumes_to_the_same_weights(tree, tmp_path, capsys):
    data = tmp_path / "corpus"
    m = build(tree, data)
    args = ["--tokens", str(data), "--steps", "4", "--save-every", "2", *TINY]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli([*args, "--output", str(full)], capsys)[0] == 0
    assert cli([*args, "--output", str(cut), "--stop-after", "2"], capsys)[0] == 0
    assert not (cut / "model.safetensors").exists()
    assert cli([*args, "--output", str(cut), "--resume"], capsys)[0] == 0
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((full / "config.json").read_text())
    assert config["vocab_size"] == m["vocab_size"]
    assert config["layerskip"]["training"]["tokens_corpus"]["tokens_sha256"] == m["tokens_sha256"]
    assert (full / "tokenizer.json").read_text() == (data / "tokenizer.json").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "MISSING"], "--tokens: "),
    (["--tokens", "CORPUS", "--vocab-size", "512"], "--vocab-size 512 differs"),
    (["--tokens", "CORPUS", "--seq-len", "4096", "--max-position-embeddings", "4096"], "--tokens: only"),
])
def test_pretrain_token_errors_name_the_flag(tree, tmp_path, capsys, extra, message):
    data = tmp_path / "corpus"
    build(tree, data)
    argv = ["--output", str(tmp_path / "o"), "--steps", "2", *TINY,
            *[str(data) if a == "CORPUS" else str(tmp_path / "nope") if a == "MISSING" else a for a in extra]]
    code, err = cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_data_and_tokens_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain.parse_args(["--data", "x", "--tokens", "y", "--output", "o", "--steps", "1", *TINY])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_corpus_refuses_bad_flags(tree, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, message in ((["--output", str(tmp_path / "o"), "--vocab-size", "70000"], "--vocab-size must be in"),
                          (["--output", str(tmp_path / "full")], "--output: "),
                          (["--output", str(tmp_path / "o"), "--stdlib", str(tmp_path / "nope")], "--stdlib: ")):
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda: corpus.main(argv))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, err


def test_dry_run_times_the_real_step(tree, tmp_path, capsys):
    from training import dry_run

    data = tmp_path / "corpus"
    build(tree, data)
    capsys.readouterr()
    run_cli(lambda: dry_run.main(["--tokens", str(data), "--shape", "2x64x128",
                                  "--batch-size", "2", "--seq-len", "16", "--steps", "2"]))
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["shape"] == "2x64x128" and line["tokens_per_s"] > 0
    assert len(line["step_times"]) == 2
    # Two layers of 4*64^2 attention + 3*64*128 MLP + norms, tied 300 x 64 embedding.
    assert line["params"] == 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 300 * 64


def test_single_step_trains():
    """The step the throughput tools time lowers the loss on a repeated batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.layerskip_model import LayerSkipLM
    from training.trainer import make_optimizer, single_step

    torch.manual_seed(0)
    model = LayerSkipLM(LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2)).train())
    opt = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 64, (2, 12))
    losses = [single_step(model, opt, ids, None, [0.0, 1.0], bf16=False) for _ in range(5)]
    assert losses[-1] < losses[0]
