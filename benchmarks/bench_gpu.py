"""dpo_core against TRL's DPOTrainer on one GPU: tokens/s, MFU and peak GPU memory.

    python benchmarks/bench_gpu.py --all --json gpu-all.json   # every target's setting, under 8 minutes on one H200
    python benchmarks/bench_gpu.py                              # one setting, a few minutes on one H100/H200
    python benchmarks/bench_gpu.py --max-length 1024 --json gpu.json
    python benchmarks/bench_gpu.py --all --quick --device cpu   # --all's code on a CPU, tiny shapes, 1-2 minutes

A GPU machine without TRL, datasets or pydantic takes them as wheels: benchmarks/gpu_wheels.sh says how.

The 0.5B model is a Llama with the shape of Qwen2.5-0.5B (hidden 896, 24 layers, 14 query / 2 key-value
heads, MLP 4864, 151,936-word vocabulary, tied embeddings: 494M parameters), randomly initialised and
saved locally, with the benchmark's word-level tokenizer padded to that vocabulary. Data, order, batch,
max_length, learning rate, beta and steps are shared exactly as in bench_trainer.py; precision is bf16
autocast for both (TRL's DPOConfig default on a GPU, fp32 master weights). Contenders run one after
another on the otherwise idle GPU, each in a fresh process; every step ends with a device synchronise.

`--all` measures, in one run and at the same batch, TRL at its defaults, dpo_core held to TRL's memory
(`max_memory` set to the peak TRL's row measured in that setting: the memory planner chooses what to
checkpoint) and dpo_core at its defaults (`max_memory`: 90% of the card):
- the 0.5B model at 8 and 32 pairs × 512 and 8 pairs × 2048 (8 steps each, the first 2 untimed);
- a Llama of Qwen2.5-7B's shape (hidden 3584, 28 layers, 28 query / 4 key-value heads, MLP 18944,
  152,064-word vocabulary, untied: 7.6B parameters) training LoRA adapters (r 16, alpha 32, dropout 0,
  every linear layer but the LM head; the reference is the model with its adapters disabled) at 8 pairs ×
  2048 (6 steps, 2 untimed). Its random weights are initialised on the GPU in bf16 and saved once (15 GB).
Both trainers load the weights in fp32, their default, and train under bf16 autocast. Rows run in order
of need: TRL and dpo_core at TRL's memory in every setting first, dpo_core at its defaults last. A
contender that runs out of GPU memory is recorded as `oom`, one that fails otherwise as `failed` (with
its log's tail), and one that would start or still runs after --time-limit seconds as `skipped` or
`timeout`. Every progress line has a timestamp and the JSON is rewritten after every row, so a run cut
short still shows what finished; the markdown table at the end gives each row's tokens/s, median step,
MFU, peak memory, and its ratios to TRL in the same setting. `--quick` shrinks the shapes (2 layers,
hidden 64, a 32k vocabulary), batches (÷4), lengths (÷8) and steps (3, 2 untimed), so that the same code
runs on a CPU; its figures mean nothing, and on a CPU the memory is the process's peak RSS.

MFU counts the model FLOPs of a step, the same for both contenders: 6·N·s + 6·layers·d·s² for every
policy sequence of s tokens (forward and backward, causal attention) and 2·N·s + 2·layers·d·s² for the
reference forward, with N the parameters that do matrix work per token (every layer, plus the LM head;
not the embedding lookup). With LoRA the frozen weights take no gradient: the policy counts 4·N·s
(the adapters' own work is left out). Work a trainer does beyond that (gradient checkpointing recomputes
the forward; dpo_core skips the LM head at prompt positions) is not counted, so MFU ratios equal tokens/s
ratios.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_trainer as bt  # noqa: E402
from bench_trainer import Contender  # noqa: E402

SHAPES = {
    # Qwen2.5-0.5B's shape, as a Llama (no q/k/v bias): the usual "0.5B" a team would tune first.
    "0.5B": dict(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True, rope_theta=1_000_000.0),
    # Qwen2.5-7B's shape, as a Llama: the size a team tunes with LoRA on one card.
    "7B": dict(vocab_size=152_064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18_944, tie_word_embeddings=False, rope_theta=1_000_000.0),
}
SHAPE = SHAPES["0.5B"]
MODEL_DIRS = {"0.5B": "bench-500m", "7B": "bench-7b"}
# --quick: tiny layers; the vocabulary still holds every word of the benchmark's data.
TINY = dict(vocab_size=32_000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)
# Dense bf16 tensor-core peak of an H100 SXM / H200 (the same chip compute), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}
# The same adapters for both: dpo_core's LoraSpec fields, and TRL's LoraConfig names for them.
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
TRL_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
WARMUP = 2  # --all: untimed first steps (kernel planning, allocator growth)
MATCHED = "dpo_core at TRL's memory"
ALL_CONTENDERS = ("TRL", MATCHED, "dpo_core")


def build_model(work_dir: Path, max_length: int, shape: str = "0.5B", tiny: bool = False) -> str:
    """A Llama of `shape` and a word tokenizer of its vocabulary under work_dir (reused if already there).

    The weights are initialised on the GPU, seconds where a CPU takes minutes at 7B; the 7B is stored in
    bf16 (15 GB rather than 30), the 0.5B in fp32. Both trainers load either in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpo_core.toy import base_vocab, build_tokenizer

    sizes = dict(SHAPES[shape], **(TINY if tiny else {}))
    out = work_dir / (MODEL_DIRS[shape] + ("-tiny" if tiny else ""))
    if (out / "config.json").is_file():
        return str(out)
    tokenizer = build_tokenizer(extra_vocab=sizes["vocab_size"] - len(base_vocab()))
    config = LlamaConfig(**sizes, max_position_embeddings=max(4096, max_length), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if shape == "7B" else torch.float32)
    model.save_pretrained(str(out))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the contenders' processes need the whole card
    return str(out)


def matmul_params(shape: dict = SHAPE) -> int:
    """Parameters doing matrix work per token: attention and MLP of every layer, and the LM head."""
    d, hd = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    layer = d * q + 2 * d * kv + q * d + 3 * d * shape["intermediate_size"]
    return shape["num_hidden_layers"] * layer + shape["vocab_size"] * d


def step_flops(lengths: list[int], reference: bool, shape: dict = SHAPE, lora: bool = False) -> float:
    """Model FLOPs of one step over sequences of these lengths (see the module docstring)."""
    n, layers, d = matmul_params(shape), shape["num_hidden_layers"], shape["hidden_size"]
    per_token = 4 if lora else 6
    policy = sum(per_token * n * s + 6 * layers * d * s * s for s in lengths)
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
            # Gradient checkpointing off for TRL (its default: on), on every layer for dpo_core (default: planned).
            Contender("TRL no grad-ckpt", "trl", p, "model", {}, {"gradient_checkpointing": False}),
            Contender("dpo_core grad-ckpt", "dpo_core", p, "model", {"gradient_checkpointing": True}),
            Contender("dpo_core precomputed", "dpo_core", p, "precomputed", {}),
        ]
    return rows


def card(device: str = "cuda", peak_tflops: float | None = None) -> tuple[str, float | None]:
    """The card's name and dense bf16 peak (TFLOP/s); on a CPU only --peak-tflops gives a peak."""
    if device == "cpu":
        return "CPU", peak_tflops
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return name, peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), PEAK_TFLOPS["H100"])


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


# --- --all: every target's setting in one run ---------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    shape: str  # a key of SHAPES
    pairs: int
    max_length: int
    steps: int
    lora: bool = False
    tiny: bool = False

    @property
    def name(self) -> str:
        return f"{self.shape}{' LoRA' if self.lora else ''} {self.pairs}×{self.max_length}"

    @property
    def slug(self) -> str:
        lora, tiny = "-lora" if self.lora else "", "-tiny" if self.tiny else ""
        return f"{self.shape}{lora}-{self.pairs}x{self.max_length}{tiny}"

    @property
    def sizes(self) -> dict:
        return dict(SHAPES[self.shape], **(TINY if self.tiny else {}))

    def quick(self) -> Setting:
        return replace(self, pairs=max(2, self.pairs // 4), max_length=self.max_length // 8, steps=WARMUP + 1,
                       tiny=True)


def all_plan(quick: bool) -> list[tuple[Setting, str]]:
    """(setting, contender) in the order they run: what the targets need first (TRL, then dpo_core held to
    TRL's peak, which it needs measured), so that a run cut short still holds them; defaults last."""
    small = [Setting("0.5B", 8, 512, 8), Setting("0.5B", 32, 512, 8), Setting("0.5B", 8, 2048, 8)]
    big = Setting("7B", 8, 2048, 6, lora=True)
    if quick:
        small, big = [s.quick() for s in small], big.quick()
    settings = [*small, big]
    plan = [(s, label) for s in settings for label in ("TRL", MATCHED)]
    return plan + [(s, "dpo_core") for s in settings]


def all_contender(label: str, lora: bool, max_memory: int | None = None) -> Contender:
    """TRL at its defaults (gradient checkpointing on); dpo_core at its defaults, or with the memory budget
    `max_memory` (bytes: TRL's peak in the same setting)."""
    if label == "TRL":
        return Contender(label, "trl", "bf16", "model", {}, {"peft_config": TRL_LORA} if lora else {})
    ours = {"lora": LORA} if lora else {}
    if max_memory is not None:
        ours["max_memory"] = max_memory
    return Contender(label, "dpo_core", "bf16", "model", ours)


def trl_peak_bytes(rows: list[dict], s: Setting) -> int | None:
    """The peak memory TRL's row measured in setting `s` (GPU memory, or RSS on a CPU), None without one."""
    found = [r for r in rows if r["setting"] == s.name and r["label"] == "TRL" and r["status"] == "ok"]
    return round(found[0]["peak_memory_gib"] * 2**30) if found else None


class Progress:
    """Timestamped progress lines, and the JSON record rewritten after every row."""

    def __init__(self, json_path: str | None):
        self.started, self.json_path = time.monotonic(), json_path

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S', time.gmtime())} +{self.elapsed():4.0f}s  {message}", flush=True)

    def save(self, record: dict) -> None:
        if not self.json_path:
            return
        tmp = Path(self.json_path + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.json_path)  # a run killed mid-write keeps the previous complete record


def row_figures(r: dict, w: bt.Workload, s: Setting, peak: float | None, device: str) -> dict:
    """tokens/s, median step and MFU over the steps after WARMUP; peak memory (GPU, or RSS on a CPU)."""
    wall, lengths = r["wall"], w.step_lengths[WARMUP:]
    timed = wall[-1] - wall[WARMUP - 1]
    flops = sum(step_flops(x, reference=True, shape=s.sizes, lora=s.lora) for x in lengths)
    return {
        "tokens_per_s": sum(w.step_tokens[WARMUP:]) / timed,
        "step_s_median": statistics.median(b - a for a, b in zip(wall[WARMUP - 1:], wall[WARMUP:])),
        "mfu": flops / timed / (peak * 1e12) if peak else None,
        "peak_memory_gib": (r["peak_gpu"] if device == "cuda" else r["peak_rss"]) / 2**30,
        "peak_gpu_gib": r["peak_gpu"] / 2**30,
        "peak_rss_gib": r["peak_rss"] / 2**30,
        "losses": r["losses"],
    }


def run_row(s: Setting, label: str, w: bt.Workload, args, work_dir: Path, peak: float | None,
            deadline: float | None, max_memory: int | None = None) -> dict:
    """One contender in a fresh process; its figures, or why there are none (oom, failed, timeout)."""
    c = all_contender(label, s.lora, max_memory)
    settings = argparse.Namespace(max_length=s.max_length, batch_size=s.pairs, steps=s.steps,
                                  learning_rate=args.learning_rate, beta=args.beta, device=args.device)
    child = bt.Child(c, w, settings, work_dir, tag=label.replace(" ", "-"), baton=False)
    row = {"setting": s.name, **asdict(s), "label": label, "log": str(child.log)}
    try:
        try:
            child.proc.wait(timeout=max(1.0, deadline - time.monotonic()) if deadline else None)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
            return {**row, "status": "timeout"}
        r = child.finish()
    except SystemExit as failed:  # one contender's failure should not cost the others' figures
        log = child.log.read_text(errors="replace")
        # The class name in the child's traceback: torch.OutOfMemoryError, raised by the CUDA allocator.
        status = "oom" if "OutOfMemoryError" in log else "failed"
        return {**row, "status": status, "error": str(failed), "log_tail": log.splitlines()[-15:]}
    finally:
        shutil.rmtree(child.out, ignore_errors=True)  # dpo_core's saved model: the disk holds the 7B once only
    return {**row, "status": "ok", "max_memory": max_memory, **row_figures(r, w, s, peak, args.device)}


def with_ratios(rows: list[dict]) -> None:
    """Each measured row's tokens/s and peak memory over TRL's in the same setting (None without one)."""
    trl = {r["setting"]: r for r in rows if r["label"] == "TRL" and r["status"] == "ok"}
    for r in rows:
        base = trl.get(r["setting"])
        ok = r["status"] == "ok" and base is not None
        r["x_trl_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
        r["x_trl_memory"] = r["peak_memory_gib"] / base["peak_memory_gib"] if ok and base["peak_memory_gib"] else None


def all_table(rows: list[dict], device: str) -> str:
    """The markdown table: settings in plan order, contenders in ALL_CONTENDERS order."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    ordered = sorted(rows, key=lambda r: (settings.index(r["setting"]), ALL_CONTENDERS.index(r["label"])))
    memory = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    lines = [f"| setting | contender | tokens/s | median step s | MFU | {memory} | × TRL tokens/s | × TRL memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ordered:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {r['label']} | {r['status'].upper()} | | | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['label']} | {r['tokens_per_s']:,.0f} | {r['step_s_median']:.3f} "
                     f"| {_num(r['mfu'], '.1%')} | {r['peak_memory_gib']:.1f} | {_num(r['x_trl_tokens_per_s'], '.2f')} "
                     f"| {_num(r['x_trl_memory'], '.2f')} |")
    return "\n".join(lines)


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def run_all(args) -> dict:
    """Every row of all_plan, one fresh process each; returns the record also written to --json."""
    progress = Progress(args.json)
    deadline = progress.started + args.time_limit if args.time_limit else None
    name, peak = card(args.device, args.peak_tflops)
    work_dir = Path(args.work_dir)
    record = {"card": name, "peak_tflops": peak, "machine": bt.machine.describe(), "argv": sys.argv[1:],
              "args": vars(args), "warmup_steps": WARMUP, "rows": []}
    print(record["machine"], flush=True)
    progress.say(f"{name}; {len(all_plan(args.quick))} rows; time limit {args.time_limit} s")
    workloads: dict[Setting, bt.Workload | str] = {}
    for s, label in all_plan(args.quick):
        if deadline and time.monotonic() > deadline:
            row = {"setting": s.name, **asdict(s), "label": label, "status": "skipped"}
        else:
            if s not in workloads:
                workloads[s] = prepare_setting(s, work_dir, progress)
            w = workloads[s]
            budget = trl_peak_bytes(record["rows"], s) if label == MATCHED else None
            if isinstance(w, str):  # the model or the data could not be made: every row of it fails alike
                row = {"setting": s.name, **asdict(s), "label": label, "status": "failed", "error": w}
            elif label == MATCHED and budget is None:
                row = {"setting": s.name, **asdict(s), "label": label, "status": "skipped",
                       "error": "no TRL peak to match in this setting"}
            else:
                progress.say(f"{s.name} {label}: starting" + (f", max_memory {budget:,} bytes" if budget else ""))
                row = run_row(s, label, w, args, work_dir / s.slug, peak, deadline, budget)
        record["rows"].append(row)
        with_ratios(record["rows"])
        progress.save(record)
        progress.say(summary(row))
    record["seconds"] = progress.elapsed()
    progress.save(record)
    print(f"\n{name}, peak {peak} TFLOP/s bf16 dense; {WARMUP} warm-up steps untimed\n")
    print(all_table(record["rows"], args.device), flush=True)
    return record


def prepare_setting(s: Setting, work_dir: Path, progress: Progress) -> bt.Workload | str:
    """The setting's model (shared by settings of the same shape) and data; the error's text if that fails."""
    started = time.monotonic()
    progress.say(f"{s.name}: preparing the model and data")
    try:
        w = bt.prepare(work_dir / s.slug, s.max_length, s.pairs, s.steps, seed=0,
                       build_model=lambda _, max_length: build_model(work_dir, max_length, s.shape, s.tiny))
    except Exception as err:  # noqa: BLE001  (report it in the row and go on with the other settings)
        progress.say(f"{s.name}: preparing failed: {err!r}")
        return f"preparing failed: {err!r}"
    progress.say(f"{s.name}: ready in {time.monotonic() - started:.0f} s; {sum(w.step_tokens):,} tokens in "
                 f"{s.steps} steps")
    return w


def summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['setting']} {r['label']}: {r['status'].upper()}" + (f" ({r['error']})" if r.get("error") else "")
    return (f"{r['setting']} {r['label']}: {r['tokens_per_s']:,.0f} tok/s  MFU {_num(r['mfu'], '.1%')}  "
            f"{r['peak_memory_gib']:.1f} GiB  × TRL {_num(r['x_trl_tokens_per_s'], '.2f')}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bt.add_workload_args(p)
    p.add_argument("--main-only", action="store_true", help="TRL and dpo_core (defaults, and with share_prompt) only")
    p.add_argument("--row", action="append", metavar="LABEL:FIELD=VALUE,...",
                   help="also run dpo_core with these TrainingSpec fields, e.g. 'unpadded:pad_to_multiple_of=1'")
    p.add_argument("--all", action="store_true", help="every target's setting in one run (the module docstring)")
    p.add_argument("--quick", action="store_true", help="with --all: tiny shapes, batches, lengths and steps")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: with --all only")
    p.add_argument("--time-limit", type=float, default=470.0,
                   help="with --all: seconds after which no row starts and a running one is stopped")
    p.add_argument("--peak-tflops", type=float, default=None, help="the MFU's peak (default: the card's)")
    p.add_argument("--work-dir", default=str(HERE.parent / ".dpo-data" / "bench-gpu"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not args.all and (args.quick or args.device == "cpu"):
        p.error("--quick and --device cpu go with --all")
    args.chunk_size = None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.all:
        run_all(args)
        return
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
