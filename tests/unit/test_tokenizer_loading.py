"""dpo_core.tokenizer_loading: the same tokenizer as AutoTokenizer, loaded without importing torch.

A child process loads each tokenizer with load_tokenizer (by directory, and one by hub id from a hub cache)
and reports its ids and chat renders, and whether torch got imported; this process loads the same
directories with AutoTokenizer and compares.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["the cat sat on the mat", "hello world", "", "  spaced  out  "]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
REPLY = [{"role": "assistant", "content": "sat on the mat"}]
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}[assistant]{% endif %}")


def summary(tok) -> dict:
    """What the trainer takes from a tokenizer: ids of texts, chat renders (text and ids), special ids."""
    def render(messages, **kw):
        return {"text": tok.apply_chat_template(messages, tokenize=False, **kw),
                "ids": list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])}

    return {"ids": tok(TEXTS)["input_ids"], "prompt": render(CHAT, add_generation_prompt=True),
            "conversation": render(CHAT + REPLY), "eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "bos": tok.bos_token_id}


def llama_style(out: Path) -> str:
    """A BPE tokenizer saved as LlamaTokenizer (Metaspace, adds BOS) with a chat template."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "▁abcdefghijklmnopqrstuvwxyz[]":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c"), ("▁c", "at")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok.chat_template = LLAMA_TEMPLATE
    tok.save_pretrained(str(out))
    return str(out)


def byte_level_named_llama(out: Path) -> str:
    """A byte-level BPE (Llama 3 style) whose tokenizer_config.json names LlamaTokenizerFast, as many hub
    checkpoints do: AutoTokenizer loads it as the generic class, and so must load_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20 + ["the system says be brief to the user"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>",
                                  chat_template=LLAMA_TEMPLATE)
    tok.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    return str(out)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> list[str]:
    from dpo_core.toy import build_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    build_tokenizer(root / "toy")
    return [str(root / "toy"), llama_style(root / "llama"), byte_level_named_llama(root / "byte-level")]


def hub_cache(root: Path, repo_id: str, files_from: str) -> str:
    """A hub cache holding `repo_id` at one commit, as a download would leave it (read offline)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return str(root)


def test_same_tokenizer_as_autotokenizer_without_torch(tokenizer_dirs, tmp_path):
    cache = hub_cache(tmp_path / "hub", "acme/llama-style", tokenizer_dirs[1])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
    done = subprocess.run([sys.executable, "-m", "tests.unit.test_tokenizer_loading", *tokenizer_dirs,
                           "acme/llama-style"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    assert loaded.pop("torch_imported") is False
    assert loaded.pop("acme/llama-style") == loaded[tokenizer_dirs[1]]  # a hub id, from the hub cache
    from transformers import AutoTokenizer

    for name in tokenizer_dirs:
        auto = AutoTokenizer.from_pretrained(name)
        if auto.pad_token_id is None:
            auto.pad_token = auto.eos_token
        assert loaded[name] == {"class": type(auto).__name__, **summary(auto)}, name
    toy, llama, byte_level = (loaded[name] for name in tokenizer_dirs)
    assert llama["class"] == "LlamaTokenizer" and llama["ids"][0][0] == llama["bos"]  # BOS added
    assert llama["pad"] == llama["eos"]  # it had no pad token
    assert byte_level["class"] == "TokenizersBackend"


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(str(tmp_path))
    from dpo_core.tokenizer_loading import load_tokenizer

    with pytest.raises(ModelLoadError, match="no EOS token"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not load tokenizer of"):
        load_tokenizer(str(tmp_path / "missing"))


if __name__ == "__main__":
    from dpo_core.tokenizer_loading import load_tokenizer

    out = {}
    for name in sys.argv[1:]:
        tokenizer = load_tokenizer(name)
        out[name] = {"class": type(tokenizer).__name__, **summary(tokenizer)}
    out["torch_imported"] = "torch" in sys.modules
    print(json.dumps(out))
