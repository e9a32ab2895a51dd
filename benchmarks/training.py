"""Training throughput on the embedded Gemma 3 270M (262k vocabulary), CPU.

SFT: persllm's train_sft vs a plain TRL SFTTrainer script with the same records, model, LoRA, batch, max_length, seed
and steps (and TRL with packing). DPO: persllm's train_dpo vs a plain TRL DPOTrainer script with the same pairs
(persllm's conversational prompt/chosen/rejected records), start model, LoRA, beta, batch, max_length, seed and steps.

Each trainer runs in its own subprocess (persllm's CPU patches are process-wide and must not leak into the
baseline); 1 warm-up step is excluded, then MEASURED optimizer steps are timed with a callback and the real
(non-padding) tokens they saw are counted.

    python -m benchmarks training
    python -m benchmarks.training --worker trl      # one side alone, prints its JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP = 1
MEASURED = 6
BATCH = 4
MAX_LENGTH = 256
THREADS = int(os.environ.get("PERSLLM_BENCH_THREADS", "2"))  # both sides; 1 on a box another job keeps busy
DPO_BATCH = 2  # pairs per step (persllm's default dpo.batch_size)
SFT_WORKERS = ("persllm", "trl", "trl-packing")
DPO_WORKERS = ("persllm-dpo", "trl-dpo")
WORKERS = (*SFT_WORKERS, "dpo-start", *DPO_WORKERS)

PERSONA_YAML = """\
name: Marie Curie
language: en
stages:
  - id: paris
    label: "1898"
    description: A physicist in Paris, working on radioactivity with Pierre.
    knowledge: knowledge.txt
    style: style.txt
sft:
  batch_size: {batch}
  max_length: {max_length}
  max_steps: {steps}
  repeat: 1
  general_ratio: 0.25
  save_steps: 100000
dpo:
  batch_size: {dpo_batch}
  max_length: {max_length}
  max_steps: {steps}
  save_steps: 100000
"""
TOPICS = ["radium", "polonium", "the shed on rue Lhomond", "pitchblende", "Pierre", "the Sorbonne", "Warsaw",
          "my daughters", "the Nobel committee", "electrometers"]


def samples() -> list[Any]:
    """40 persona samples of ~100-200 tokens after templating (the reference measurement's range)."""
    from persllm.types import Sample

    out = []
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        out.append(Sample(
            id=f"s{i}", persona="marie-curie", stage="paris", time_label="1898", kind="ordinary",
            question=f"What do you remember about {topic}, and why did it matter to you in those years?",
            analysis=(f"The question is about {topic}. I answer from what I know in 1898, in my own voice, "
                      "without claiming later discoveries. " * (1 + i % 3)).strip(),
            response=(f"{topic.capitalize()} was part of every day of my work: we measured, we failed, and we "
                      "measured again until the numbers agreed. " * (1 + i % 2)).strip(),
            seed_id=f"p{i}", split="train"))
    return out


def general() -> list[list[Any]]:
    """A few general conversations (persllm mixes them in; both trainers get the same mixed records)."""
    from persllm.types import Message

    return [[Message("user", f"Give me {n} tips for a quiet evening."),
             Message("assistant", " ".join(f"Tip {k}: put the work away and read." for k in range(1, n + 1)))]
            for n in range(2, 6)]


def project(root: Path) -> Any:
    """The benchmark persona project on the embedded default model."""
    from persllm.config import load_project

    root.mkdir(parents=True, exist_ok=True)
    (root / "persona.yaml").write_text(PERSONA_YAML.format(batch=BATCH, dpo_batch=DPO_BATCH, max_length=MAX_LENGTH,
                                                           steps=WARMUP + MEASURED), encoding="utf-8")
    (root / "knowledge.txt").write_text("Marie Curie discovered polonium and radium with Pierre Curie.\n")
    (root / "style.txt").write_text("We must believe that we are gifted for something.\n")
    return load_project(root)


def records(proj: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Exactly the records persllm trains on (same mix, shuffle and length filter)."""
    from persllm.train.data import build_sft_records
    from persllm.train.sft import drop_too_long

    built, _ = build_sft_records(proj, samples(), general())
    return drop_too_long(built, tokenizer, MAX_LENGTH)[0]


def pairs(proj: Any) -> list[Any]:
    """40 preference pairs on the benchmark samples: the golden answer against an off-persona one of varied length."""
    from persllm.train.data import answer_text, sample_prompt
    from persllm.types import PreferencePair

    out = []
    for i, sample in enumerate(samples()):
        topic = TOPICS[i % len(TOPICS)]
        rejected = (f"As an AI language model I have no memories of {topic}, but I can share some general facts "
                    "about it and about science in that period. " * (1 + i % 3)).strip()
        out.append(PreferencePair(f"d{i}", sample.id, "non_personified", tuple(sample_prompt(proj, sample)),
                                  answer_text(proj, sample.analysis, sample.response), rejected))
    return out


def dpo_records(proj: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Exactly the pair records persllm trains on (pair_record, same length filter)."""
    from persllm.train.data import pair_record
    from persllm.train.dpo import drop_too_long_pairs

    return drop_too_long_pairs([pair_record(p) for p in pairs(proj)], tokenizer, MAX_LENGTH)[0]


def lora() -> Any:
    """The LoRA both sides train (persllm's defaults: r16, alpha 32, dropout 0.05, all linear layers)."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


TURNS: tuple[int, int] | None = None  # (read "go", write "done") pipe ends when run in lock-step (--turns)


def step_timer() -> Any:
    """A TrainerCallback recording each optimizer step's wall time and the input tokens seen so far.

    In lock-step (TURNS set), each step waits for the parent's go and reports its end, so the sides of a comparison
    take turns step by step and whatever else runs on the machine slows both alike; at the end of training the
    worker waits until every side has finished its steps (persllm's smoke test must not run beside a timed step).
    """
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, float, int]] = []  # (start, end, tokens seen at end)
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _turn()
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps.append((self._start, time.perf_counter(), int(state.num_input_tokens_seen)))
            _report(b"s")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _turn()
            _report(b"e")
            _turn()  # released once every side is done

    return Timer()


def _turn() -> None:
    if TURNS is not None:
        os.read(TURNS[0], 1)  # b"" when the parent is gone: go on


def _report(message: bytes) -> None:
    if TURNS is not None:
        with contextlib.suppress(OSError):
            os.write(TURNS[1], message)


def summarize(timer: Any) -> dict[str, Any]:
    """Tokens/s over the measured steps (warm-up excluded), and each measured step's seconds and tokens."""
    steps = timer.steps
    measured = steps[WARMUP:]
    durations = [end - start for start, end, _ in measured]
    seen = [tokens for _, _, tokens in steps]
    step_tokens = [b - a for a, b in zip([0, *seen], seen, strict=False)][WARMUP:]
    tokens = sum(step_tokens)
    return {"steps": len(measured), "seconds": sum(durations), "tokens": tokens,
            "tokens_per_second": tokens / sum(durations), "seconds_per_step": sum(durations) / len(measured),
            "step_seconds": [round(d, 3) for d in durations], "step_tokens": step_tokens}


def median_step_speedup(ours: dict[str, Any], other: dict[str, Any]) -> float:
    """Median over steps of persllm's step tokens/s over the baseline's step tokens/s (step i against step i). The
    sides batch differently (persllm groups by length), so steps are compared by throughput, not by time; on a
    shared machine the median of paired ratios shrugs off a few steps slowed by other jobs."""
    import statistics

    def rates(side: dict[str, Any]) -> list[float]:
        return [t / s for t, s in zip(side["step_tokens"], side["step_seconds"], strict=True)]

    return statistics.median(a / b for a, b in zip(rates(ours), rates(other), strict=False))


# -- workers (one per subprocess) ---------------------------------------------------------------------------------
def run_persllm(workdir: Path) -> dict[str, Any]:
    """persllm's train_sft: CPU fast-loss patch, assistant-only loss, denormals flushed."""
    from persllm.train.sft import train_sft

    proj = project(workdir / "persona")
    timer = step_timer()
    stats = train_sft(proj, samples(), general(), workdir / "sft", callbacks=[timer])
    return summarize(timer) | {"fast_cpu_loss": stats["fast_cpu_loss"]}


def run_persllm_dpo(workdir: Path, start: Path) -> dict[str, Any]:
    """persllm's train_dpo from the SFT result in `start` (its step-0 check runs before the timed steps)."""
    from persllm.train.dpo import train_dpo

    proj = project(workdir / "persona")
    timer = step_timer()
    stats = train_dpo(proj, pairs(proj), start, workdir / "dpo", callbacks=[timer])
    return summarize(timer) | {"fast_cpu_loss": stats["fast_cpu_loss"], "records": stats["pairs"],
                               "step0_loss": stats["sanity"].get("loss")}


def build_dpo_start(start: Path) -> dict[str, Any]:
    """An SFT result both DPO sides start from: a fresh LoRA adapter (B = 0, so the merged model is the base) with
    the tokenizer, laid out as persllm's SFT writes it. Building it in a real SFT run would only add minutes."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.backends.hf import ADAPTER_STACK_FILE
    from persllm.models import embedded_hf_dir

    base = str(embedded_hf_dir())
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora())
    adapter = start / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter / ADAPTER_STACK_FILE).write_text(json.dumps({"stack": [], "base": base}), encoding="utf-8")
    return {"start": str(adapter)}


def run_trl_dpo(workdir: Path, start: Path) -> dict[str, Any]:
    """What a user would write with TRL alone: the SFT adapter merged into the base, a new LoRA, the same pairs,
    beta, learning rate, batch, max_length, seed and steps; reference = the adapter disabled (TRL's PEFT default)."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from persllm.models import embedded_hf_dir

    adapter = start / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    proj = project(workdir / "persona")
    data = dpo_records(proj, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(embedded_hf_dir()), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    args = DPOConfig(output_dir=str(workdir / "trl-dpo"), per_device_train_batch_size=DPO_BATCH,
                     max_length=MAX_LENGTH, max_steps=WARMUP + MEASURED, learning_rate=proj.dpo.learning_rate,
                     beta=proj.dpo.beta, seed=proj.seed, data_seed=proj.seed, bf16=False, use_cpu=True,
                     gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=1,
                     disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    timer = step_timer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=lora(), callbacks=[timer])
    trainer.train()
    return summarize(timer) | {"records": len(data)}


def run_trl(workdir: Path, packing: bool) -> dict[str, Any]:
    """What a user would write with TRL alone: same records, LoRA, batch, max_length, seeds, assistant-only loss."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from persllm.models import embedded_hf_dir

    base = str(embedded_hf_dir())
    tokenizer = AutoTokenizer.from_pretrained(base)  # carries persllm's chat template, like persllm's own run
    proj = project(workdir / "persona")
    data = records(proj, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     max_steps=WARMUP + MEASURED, learning_rate=2e-4, seed=proj.seed, data_seed=proj.seed, bf16=False,
                     use_cpu=True, gradient_checkpointing=False, assistant_only_loss=True,
                     eos_token="<end_of_turn>", packing=packing, save_strategy="no", report_to="none",
                     logging_steps=1, disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    timer = step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=lora(), callbacks=[timer])
    trainer.train()
    return summarize(timer) | {"records": len(data)}


def worker(name: str, start: Path | None = None) -> dict[str, Any]:
    """Run one side in this process (the DPO workers and dpo-start need `start`, the shared SFT result dir)."""
    import torch

    torch.set_num_threads(THREADS)
    if name == "dpo-start":
        return build_dpo_start(_need(start))
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name == "persllm":
            return run_persllm(Path(tmp))
        if name == "persllm-dpo":
            return run_persllm_dpo(Path(tmp), _need(start))
        if name == "trl-dpo":
            return run_trl_dpo(Path(tmp), _need(start))
        return run_trl(Path(tmp), packing=name == "trl-packing")


def _need(start: Path | None) -> Path:
    if start is None:
        raise SystemExit("this worker needs --start DIR (the SFT result dir; make it with --worker dpo-start)")
    return start


def _command(name: str, start: str | None, turns: str | None = None) -> list[str]:
    return [sys.executable, "-m", "benchmarks.training", "--worker", name, *(["--start", start] if start else []),
            *(["--turns", turns] if turns else [])]


def _env() -> dict[str, str]:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(THREADS))


def _result(returncode: int, stdout: str, stderr: str, started: float) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if returncode != 0 or not lines:
        return {"error": (stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1]) | {"wall_seconds": round(time.monotonic() - started, 1)}


def measure(name: str, start: str | None = None) -> dict[str, Any]:
    """One side in a fresh subprocess; {"error": ...} if it failed."""
    started = time.monotonic()
    proc = subprocess.run(_command(name, start), check=False, capture_output=True, text=True, env=_env(),
                          cwd=Path(__file__).resolve().parent.parent)
    return _result(proc.returncode, proc.stdout, proc.stderr, started)


def lockstep(names: tuple[str, ...], start: str | None = None) -> dict[str, dict[str, Any]]:
    """The sides of one comparison in their own subprocesses, loaded together, then stepping in turn: one optimizer
    step of each side, round robin, never two at once. A job that shares the machine slows neighbouring steps of
    every side alike instead of one side's whole run, which is what made back-to-back runs incomparable."""
    started = time.monotonic()
    with contextlib.ExitStack() as files:
        sides = {}
        for name in names:
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            out, err = (files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            proc = subprocess.Popen(_command(name, start, f"{go_r},{done_w}"), stdout=out, stderr=err, env=_env(),
                                    pass_fds=(go_r, done_w), cwd=Path(__file__).resolve().parent.parent)
            os.close(go_r)
            os.close(done_w)
            sides[name] = (proc, go_w, done_r, out, err)
        active = list(names)
        try:
            while active:
                for name in list(active):
                    _, go_w, done_r, _, _ = sides[name]
                    try:
                        os.write(go_w, b"g")
                        reply = os.read(done_r, 1)
                    except OSError:  # the worker is gone
                        reply = b""
                    if reply != b"s":  # trained all its steps (b"e") or failed (b"")
                        active.remove(name)
        finally:
            for proc, go_w, done_r, _, _ in sides.values():
                with contextlib.suppress(OSError):
                    os.write(go_w, b"g")  # let every side finish (smoke tests, saving) now that no step is timed
                os.close(go_w)
                proc.wait()
                os.close(done_r)
        results = {}
        for name, (proc, _, _, out, err) in sides.items():
            out.seek(0)
            err.seek(0)
            results[name] = _result(proc.returncode, out.read(), err.read(), started)
    return results


def run() -> list[dict[str, Any]]:
    results = lockstep(SFT_WORKERS)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-start-") as start:
        results["dpo-start"] = measure("dpo-start", start)
        if "error" in results["dpo-start"]:
            results |= dict.fromkeys(DPO_WORKERS, results["dpo-start"])
        else:
            results |= lockstep(DPO_WORKERS, start)
    for name, result in results.items():
        print(f"  {name}: {json.dumps(result)}", flush=True)
    ours, rows = results["persllm"], []
    if "error" in ours:
        raise RuntimeError(f"persllm training failed: {ours['error']}")
    for name, label in (("trl", "plain TRL SFTTrainer"), ("trl-packing", "TRL SFTTrainer, packing=True")):
        other = results[name]
        if "error" in other:
            rows.append(_failed(f"SFT tokens/s, 270M CPU, vs {name}", ours, label, other))
            continue
        note = (f"{MEASURED} steps after {WARMUP} warm-up, batch {BATCH}, max_length {MAX_LENGTH}, LoRA r16 "
                f"all-linear; {ours['seconds_per_step']:.1f} vs {other['seconds_per_step']:.1f} s/step; tokens "
                f"{ours['tokens']} vs {other['tokens']}")
        if name == "trl":
            note += (f"; median paired per-step tokens/s ratio {median_step_speedup(ours, other):.2f}x; persllm "
                     "batches by length, so its steps see other records than TRL's")
        else:
            note += "; TRL packs the same records into fewer, fuller rows; persllm does not pack"
        kind = "vs TRL packing" if name == "trl-packing" else "same data"
        rows.append(_row(f"SFT tokens/s, 270M CPU, {kind}", ours, other, label, note))
    dpo, other = results["persllm-dpo"], results["trl-dpo"]
    label = "plain TRL DPOTrainer"
    if "error" in dpo:
        raise RuntimeError(f"persllm DPO failed: {dpo['error']}")
    if "error" in other:
        rows.append(_failed("DPO tokens/s, 270M CPU, same pairs", dpo, label, other))
    else:
        pair_rate = [side["steps"] * DPO_BATCH / side["seconds"] for side in (dpo, other)]
        note = (f"{MEASURED} steps after {WARMUP} warm-up, {DPO_BATCH} pairs/step, max_length {MAX_LENGTH}, LoRA r16 "
                f"all-linear, beta {0.1}, reference = adapter disabled on both; {dpo['seconds_per_step']:.1f} vs "
                f"{other['seconds_per_step']:.1f} s/step; {pair_rate[0]:.2f} vs {pair_rate[1]:.2f} pairs/s; tokens "
                f"{dpo['tokens']} vs {other['tokens']}; median paired per-step tokens/s ratio "
                f"{median_step_speedup(dpo, other):.2f}x; persllm's step-0 check (before training) not timed")
        rows.append(_row("DPO tokens/s, 270M CPU, same pairs", dpo, other, label, note))
    return rows


def _row(benchmark: str, ours: dict[str, Any], other: dict[str, Any], label: str, note: str) -> dict[str, Any]:
    note += f"; sides in lock-step, {THREADS} torch thread{'s' if THREADS > 1 else ''} each"
    return {"benchmark": benchmark, "persllm": ours["tokens_per_second"], "baseline": other["tokens_per_second"],
            "unit": "t/s", "ratio": ours["tokens_per_second"] / other["tokens_per_second"], "higher_is_better": True,
            "baseline_name": label, "note": note}


def _failed(benchmark: str, ours: dict[str, Any], label: str, other: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": benchmark, "persllm": ours["tokens_per_second"], "baseline": float("nan"), "unit": "t/s",
            "ratio": float("nan"), "higher_is_better": True, "baseline_name": label,
            "note": f"baseline failed: {other['error']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=WORKERS, required=True)
    parser.add_argument("--start", type=Path, help="SFT result dir for the DPO workers (made by dpo-start)")
    parser.add_argument("--turns", help="READ_FD,WRITE_FD: take steps in turn with other sides (see lockstep)")
    args = parser.parse_args()
    if args.turns:
        global TURNS
        go, done = (int(fd) for fd in args.turns.split(","))
        TURNS = (go, done)
    print(json.dumps(worker(args.worker, args.start)), flush=True)


if __name__ == "__main__":
    main()
