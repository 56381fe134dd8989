"""Pre-flight data report speed: dpo_core.preflight.data_report over 10,000 rows with a 32k BPE tokenizer.

    .venv/bin/python benchmarks/bench_preflight.py                              # 10,000 chat rows
    .venv/bin/python benchmarks/bench_preflight.py --format text                # 10,000 text rows
    .venv/bin/python benchmarks/bench_preflight.py --rows 200 --vocab-size 2000 # quick
    .venv/bin/python benchmarks/bench_preflight.py --route                      # also the HTTP route

No network. The tokenizer is a byte-level BPE of --vocab-size trained with the `tokenizers` library on
generated text (words drawn from a Zipf distribution over made-up words), saved as a transformers fast
tokenizer with a ChatML chat template, and built once per work directory. The rows are generated the
same way: prompts of 20 to 400 words, completions of 10 to 300. The timed part is what the service does
for a pre-flight in one process: load_tokenizer (dpo_core.tokenizer_loading) and data_report on the
training file, at the spec's defaults (max_length 1024, max_prompt_length 512). torch is never imported.

--route also times POST /v1/fine_tuning/jobs/preflight on the real app (in this process, SQLite, one
registered CPU worker): the same report plus the estimate, for a small Llama config (safetensors
headers over zero weights, written with numpy) beside the tokenizer.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import machine  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--format", choices=["conversational", "text"], default="conversational")
    p.add_argument("--vocab-size", type=int, default=32_000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest and the median are printed")
    p.add_argument("--work-dir", default=str(REPO / ".dpo-data" / "bench" / "preflight"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--route", action="store_true", help="also time the HTTP route (the report and the estimate)")
    return p.parse_args(argv)


class Words:
    """Made-up words drawn with Zipf weights, the frequent ones short (as in English: "the", "of"), so that
    a 32k BPE learns real merges and the text has English's characters per token (about 4)."""

    def __init__(self, seed: int, size: int = 50_000):
        rng = random.Random(0)  # the same words for every seed: the tokenizer's corpus and the rows share them
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
        words = {"".join(rng.choices(syllables, k=rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(size)}
        self.words = sorted(words, key=lambda w: (len(w), rng.random()))
        self.cum_weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(self.words))))
        self.rng = random.Random(seed)

    def text(self, n: int) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=n)
        return " ".join(words).capitalize() + "."


def build_tokenizer(out: Path, vocab_size: int) -> str:
    """A byte-level BPE trained on generated text, saved as a fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file() and json.loads((out / "vocab_size").read_text()) == vocab_size:
        return str(out)
    words = Words(seed=1)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((words.text(50) for _ in range(40_000)), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML)
    tok.save_pretrained(str(out))
    (out / "vocab_size").write_text(json.dumps(vocab_size))
    return str(out)


def write_rows(path: Path, n: int, fmt: str) -> None:
    words, rng = Words(seed=2), random.Random(3)
    with path.open("w") as f:
        for _ in range(n):
            prompt = words.text(rng.randint(20, 400))
            chosen, rejected = words.text(rng.randint(10, 300)), words.text(rng.randint(10, 300))
            if fmt == "text":
                row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
            else:
                row = {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}],
                       "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]}
            f.write(json.dumps(row) + "\n")


def timed_report(model: str, train_file: str) -> tuple[float, float, float, dict]:
    """(seconds to load the tokenizer, seconds for data_report, its CPU seconds in this process, the report)."""
    from dpo_core.preflight import data_report
    from dpo_core.spec import TrainingSpec
    from dpo_core.tokenizer_loading import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    loaded, cpu = time.perf_counter(), time.process_time()
    report = data_report(TrainingSpec(model=model, train_file=train_file), tokenizer)
    return loaded - started, time.perf_counter() - loaded, time.process_time() - cpu, report


def write_model(model_dir: Path, vocab_size: int) -> None:
    """A Llama config and zero weights of its shape (hidden 256, 2 layers) beside the tokenizer."""
    import numpy as np
    from safetensors.numpy import save_file

    hidden, inter, layers = 256, 512, 2
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": vocab_size, "max_position_embeddings": 2048,
              "tie_word_embeddings": False}
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden), "lm_head.weight": (vocab_size, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file({k: np.zeros(v, dtype=np.float32) for k, v in shapes.items()}, str(model_dir / "model.safetensors"))


def timed_route(model: str, train_file: Path, repeats: int) -> list[float]:
    """Seconds of each POST /v1/fine_tuning/jobs/preflight on the real app, the file uploaded once."""
    import tempfile

    from fastapi.testclient import TestClient

    from api.main import create_app
    from service.db.engine import make_engine, make_sessionmaker
    from service.db.workers import register
    from service.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="bench-preflight-"))
    settings = Settings(data_dir=data, api_key="k", database_url=None, broker_url=None, dispatcher=False,
                        model_dirs=[str(Path(model).parent)])
    with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as c:
        with make_sessionmaker(make_engine(settings.db_url)).begin() as s:
            register(s, name="bench-cpu", gpu_type="cpu", gpus=1, queue_prefix=settings.queue, hostname="bench",
                     pid=1, lost_after_s=settings.worker_lost_after_s, memory_bytes=24 << 30)
        with train_file.open("rb") as f:
            file_id = c.post("/v1/files", files={"file": (train_file.name, f)}, data={"purpose": "fine-tune"}).json()["id"]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            r = c.post("/v1/fine_tuning/jobs/preflight", json={"model": model, "training_file": file_id})
            times.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
    return sorted(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    machine_line = machine.describe(with_torch=False)
    print(machine_line, flush=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_tokenizer(work / f"bpe-{args.vocab_size}", args.vocab_size)
    train_file = work / f"{args.format}-{args.rows}.jsonl"
    if not train_file.is_file():
        write_rows(train_file, args.rows, args.format)
    print(f"set-up (tokenizer, data): {time.perf_counter() - started:.1f} s", flush=True)
    runs = [timed_report(model, str(train_file)) for _ in range(args.repeats)]
    load_s, report_s, cpu_s = (sorted(r[i] for r in runs) for i in range(3))
    data = runs[0][3]["training_file"]
    record = {"machine": machine_line, "rows": data["rows"], "format": args.format,
              "vocab_size": args.vocab_size, "tokens": data["tokens"]["total"], "lengths": data["lengths"],
              "load_s": load_s, "report_s": report_s, "cpu_s": cpu_s, "torch_imported": "torch" in sys.modules}
    print(f"{data['rows']:,} {args.format} rows, {data['tokens']['total']:,} tokens (one epoch), prompt p50 "
          f"{data['lengths']['prompt']['p50']} tokens, chosen p50 {data['lengths']['chosen']['p50']}")
    print(f"load_tokenizer: {load_s[0]:.2f} s; data_report: {report_s[0]:.2f} s fastest, "
          f"{report_s[len(report_s) // 2]:.2f} s median of {args.repeats} "
          f"({data['rows'] / report_s[0]:,.0f} rows/s), {cpu_s[0]:.2f} CPU s; torch imported: {record['torch_imported']}")
    if args.route:
        write_model(Path(model), args.vocab_size)
        route_s = timed_route(model, train_file, args.repeats)
        record["route_s"] = route_s
        print(f"POST /v1/fine_tuning/jobs/preflight: {route_s[0]:.2f} s fastest, {route_s[len(route_s) // 2]:.2f} s "
              f"median of {args.repeats}; torch imported: {'torch' in sys.modules}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
