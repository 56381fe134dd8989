"""dpo_core against TRL's DPOTrainer on one GPU: tokens/s, MFU and peak GPU memory for a ~0.5B model.

    python benchmarks/bench_gpu.py                      # the GPU comparison, a few minutes on one H100/H200
    python benchmarks/bench_gpu.py --max-length 1024 --json gpu.json

The model is a Llama with the shape of Qwen2.5-0.5B (hidden 896, 24 layers, 14 query / 2 key-value heads,
MLP 4864, 151,936-word vocabulary, tied embeddings: 494M parameters), randomly initialised and saved
locally, with the benchmark's word-level tokenizer padded to that vocabulary. Data, order, batch,
max_length, learning rate, beta and steps are shared exactly as in bench_trainer.py; precision is bf16
autocast for both (TRL's DPOConfig default on a GPU, fp32 master weights). Contenders run one after
another on the otherwise idle GPU, each in a fresh process; every step ends with a device synchronise.

MFU counts the model FLOPs of a step, the same for both contenders: 6·N·s + 6·layers·d·s² for every
policy sequence of s tokens (forward and backward, causal attention) and 2·N·s + 2·layers·d·s² for the
reference forward, with N the parameters that do matrix work per token (every layer, plus the LM head;
not the embedding lookup). Work a trainer does beyond that (TRL's gradient checkpointing recomputes the
forward; dpo_core skips the LM head at prompt positions) is not counted, so MFU ratios equal tokens/s
ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_trainer as bt  # noqa: E402
from bench_trainer import Contender  # noqa: E402

# Qwen2.5-0.5B's shape, as a Llama (no q/k/v bias): the usual "0.5B" a team would tune first.
SHAPE = dict(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True, rope_theta=1_000_000.0)
# Dense bf16 tensor-core peak of an H100 SXM / H200 (the same chip compute), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}


def build_model(work_dir: Path, max_length: int) -> str:
    """The 0.5B Llama and a word tokenizer of its vocabulary under work_dir (reused if already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_core.toy import base_vocab, build_tokenizer

    out = work_dir / "bench-500m"
    if (out / "config.json").is_file():
        return str(out)
    tokenizer = build_tokenizer(extra_vocab=SHAPE["vocab_size"] - len(base_vocab()))
    config = LlamaConfig(**SHAPE, max_position_embeddings=max(4096, max_length), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 494M weights on the GPU is fast
        model = LlamaForCausalLM(config)
    model.to("cpu").save_pretrained(str(out))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))
    return str(out)


def matmul_params() -> int:
    """Parameters doing matrix work per token: attention and MLP of every layer, and the LM head."""
    d, hd = SHAPE["hidden_size"], SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    q, kv = SHAPE["num_attention_heads"] * hd, SHAPE["num_key_value_heads"] * hd
    layer = d * q + 2 * d * kv + q * d + 3 * d * SHAPE["intermediate_size"]
    return SHAPE["num_hidden_layers"] * layer + SHAPE["vocab_size"] * d


def step_flops(lengths: list[int], reference: bool) -> float:
    """Model FLOPs of one step over sequences of these lengths (see the module docstring)."""
    n, layers, d = matmul_params(), SHAPE["num_hidden_layers"], SHAPE["hidden_size"]
    policy = sum(6 * n * s + 6 * layers * d * s * s for s in lengths)
    ref = sum(2 * n * s + 2 * layers * d * s * s for s in lengths) if reference else 0
    return float(policy + ref)


def mfu(r: dict, w: bt.Workload, peak: float) -> float:
    """Model FLOPs over steps 2..N divided by their wall time and the card's peak."""
    flops = sum(step_flops(lengths, r["reference"]) for lengths in w.step_lengths[1:])
    return flops / (r["wall"][-1] - r["wall"][0]) / (peak * 1e12)


def contenders(args) -> list[Contender]:
    p = "bf16"
    rows = [
        Contender("TRL", "trl", p, "model", {}),
        Contender("dpo_core", "dpo_core", p, "model", {}),
        Contender("dpo_core shared prompt", "dpo_core", p, "model", {"share_prompt": True}),
    ]
    rows += [bt.row_contender(row, p, "model", {}) for row in args.row or []]
    if not args.main_only:
        rows += [
            # Each with the other's gradient-checkpointing default (TRL: on, dpo_core: off).
            Contender("TRL no grad-ckpt", "trl", p, "model", {}, {"gradient_checkpointing": False}),
            Contender("dpo_core grad-ckpt", "dpo_core", p, "model", {"gradient_checkpointing": True}),
            Contender("dpo_core precomputed", "dpo_core", p, "precomputed", {}),
        ]
    return rows


def card() -> tuple[str, float]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name), PEAK_TFLOPS["H100"])


def report(results: list[dict], w: bt.Workload, peak: float) -> str:
    base = results[0]
    lines = [
        "| contender | tokens/s | median step s | MFU | peak GPU GiB | peak RSS GiB | × TRL tokens/s | × paired steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        paired = statistics.median(bt._paired_step_ratios(r, base))
        lines.append(
            f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['step_s_median']:.3f} | {mfu(r, w, peak):.1%} "
            f"| {r['peak_gpu'] / 2**30:.1f} | {r['peak_rss'] / 2**30:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} "
            f"| {paired:.2f} |"
        )
    lines += ["", bt._loss_table({r["label"]: [r] for r in results}, argparse.Namespace(steps=len(base["losses"])))]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bt.add_workload_args(p)
    p.add_argument("--main-only", action="store_true", help="TRL and dpo_core (defaults, and with share_prompt) only")
    p.add_argument("--row", action="append", metavar="LABEL:FIELD=VALUE,...",
                   help="also run dpo_core with these TrainingSpec fields, e.g. 'unpadded:pad_to_multiple_of=1'")
    p.add_argument("--work-dir", default=str(HERE.parent / ".dpo-data" / "bench-gpu"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.device, args.chunk_size = "cuda", None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    name, peak = card()
    print(bt.machine.describe(), flush=True)
    work_dir = Path(args.work_dir)
    started = time.perf_counter()
    w = bt.prepare(work_dir, args.max_length, args.batch_size, args.steps, seed=0, build_model=build_model)
    print(f"{name}; model and data ready in {time.perf_counter() - started:.0f} s; {sum(w.step_tokens):,} tokens in "
          f"{args.steps} steps; max_length {args.max_length}, batch {args.batch_size} pairs, bf16", flush=True)
    results = []
    for c in contenders(args):
        t = time.perf_counter()
        try:
            r = bt.run_one(c, w, args, work_dir, tag=c.label.replace(" ", "-"))
        except SystemExit as failed:  # one contender's failure should not cost the others' figures
            print(f"  {failed}", flush=True)
            continue
        r["reference"] = c.reference_mode == "model"
        results.append(r)
        print(f"  {c.label:<22} {r['tokens_per_s']:9,.0f} tok/s  MFU {mfu(r, w, peak):.1%}  "
              f"{r['peak_gpu'] / 2**30:.1f} GiB  ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\n{name}, peak {peak} TFLOP/s bf16 dense; {matmul_params() / 1e6:.0f}M matmul parameters\n")
    print(report(results, w, peak))
    if args.json:
        Path(args.json).write_text(json.dumps({"card": name, "args": vars(args), "step_tokens": w.step_tokens,
                                               "runs": results}, indent=1))


if __name__ == "__main__":
    main()
