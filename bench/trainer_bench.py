"""Trainer: training steps/s and peak memory, this trainer vs transformers.Trainer.

Both train the same LoRA (rank 8 on q,v, fp32) on the default model, the same 96 rows
(dialect utterance → English, prompt tokens masked out of the loss) for the same number
of optimizer steps at batch size 8. The baseline is ``transformers.Trainer`` + PEFT +
``DataCollatorForSeq2Seq`` (pad to the longest row of each batch; labels -100 on the
prompt), i.e. what a tutorial would do. Each side runs in its own process (peak RSS is
per process) after two untimed warm-up steps. A stage-by-stage profile of this trainer's
step and the cost of the full-vocabulary projection follow.

    python -m bench.trainer_bench
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_table, target, write_results

ROWS = [
    ("侬今朝吃饭伐?", "Have you eaten today?"),
    ("阿拉屋里向个电费单子寄错地址了。",
     "The electricity bill for our home was sent to the wrong address."),
    ("我今朝有眼勿适意，想请个假。",
     "I am not feeling well today and would like to take a day off."),
    ("我張單幾時到期呀?", "When is my bill due?"),
    ("你哋幾點收工? 我想聽日過嚟攞貨。",
     "What time do you close? I want to come and pick up the goods tomorrow."),
    ("唔該幫我查吓個包裹去咗邊。", "Please help me check where my parcel has gone."),
    ("侬好", "Hello"),
    ("再会", "Goodbye"),
]
BATCH = 8
STEPS = 10
WARMUP = 2
LR = 2e-4


def write_data(folder: Path) -> Path:
    lines = ["text,label"]
    for i in range(BATCH * (STEPS + WARMUP)):
        text, label = ROWS[i % len(ROWS)]
        lines.append(f'"{text} ({i})","{label} (ref {i})"')
    path = folder / "data.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_ours(folder: Path) -> dict:
    """This trainer's loop (``train_loop``) on the data, minus warm-up steps."""
    import torch

    from trainer.config import load_train_config
    from trainer.data import encode
    from trainer.loop import train_loop
    from trainer.model import load_for_training
    from trainer.plan import plan_run

    (folder / "train.yaml").write_text(
        f"name: bench\nmetadata_path: data.csv\nbatch_size: {BATCH}\nepochs: 1\n"
        f"learning_rate: {LR}\nval_split: 0\nsave_steps: 0\ndropout: 0.05\n"
        f"output_dir: {folder / 'runs' / 'ours'}\nwarmup_ratio: 0\n")
    config = load_train_config(folder / "train.yaml")
    plan = plan_run(config, publish=False)
    torch.manual_seed(0)
    base, model = load_for_training(config, plan)
    examples = encode(plan.train_rows, base.tokenizer, config.prompt_template,
                      config.max_seq_length, True).examples
    pad = base.tokenizer.pad_token_id
    train_loop(config, model, examples[: BATCH * WARMUP], [], pad, quiet=True)  # warm-up
    result = train_loop(config, model, examples[BATCH * WARMUP:], [], pad, quiet=True)
    peak = peak_rss_mb()  # before the profile, which adds a full-vocabulary projection
    profile = stage_profile(model, examples[BATCH * WARMUP:], pad)
    return {"steps": result.progress.step, "seconds": result.seconds,
            "steps_per_s": result.progress.step / result.seconds,
            "peak_rss_mb": peak, "profile_ms_per_step": profile}


def stage_profile(model, examples, pad: int) -> dict[str, float]:
    """Mean ms per step in each stage of this trainer's step, and the full-vocabulary
    projection the baseline pays instead of the label-only one."""
    import torch
    import torch.nn.functional as F

    from trainer.data import IGNORE, collate

    causal = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    stages = {"body_forward": 0.0, "label_head_and_loss": 0.0, "backward": 0.0,
              "optimizer": 0.0, "full_vocab_head_forward_baseline": 0.0}
    batches = [examples[i : i + BATCH] for i in range(0, BATCH * 4, BATCH)]
    for chunk in batches:
        batch = collate(chunk, pad)
        t0 = time.perf_counter()
        hidden = causal.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
        t1 = time.perf_counter()
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        loss = F.cross_entropy(causal.lm_head(hidden[:, :-1][keep]).float(), targets[keep])
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t4 = time.perf_counter()
        with torch.no_grad():
            causal.lm_head(hidden.detach())  # what a full-sequence forward projects
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                                 strict=True):
            stages[name] += seconds * 1000 / len(batches)
    return {k: round(v, 1) for k, v in stages.items()}


def run_baseline(folder: Path) -> dict:
    """transformers.Trainer + PEFT + DataCollatorForSeq2Seq, same data and masking."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from server.basemodel import load_base_model
    from server.formats.prompt import DEFAULT_PROMPT_TEMPLATE
    from trainer.data import encode
    from trainer.rows import read_rows

    torch.manual_seed(0)
    base = load_base_model("default", dtype="float32")
    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    examples = encode(read_rows(folder / "data.csv"), base.tokenizer, DEFAULT_PROMPT_TEMPLATE,
                      256, True).examples
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
             "labels": e.labels} for e in examples]
    collator = DataCollatorForSeq2Seq(base.tokenizer, padding="longest",
                                      label_pad_token_id=-100)

    def trainer_for(data: list[dict], out: str) -> Trainer:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH,
                                 num_train_epochs=1, learning_rate=LR, save_strategy="no",
                                 logging_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=data, data_collator=collator)

    trainer_for(rows[: BATCH * WARMUP], str(folder / "hf-warm")).train()
    baseline = trainer_for(rows[BATCH * WARMUP:], str(folder / "hf"))
    started = time.perf_counter()
    output = baseline.train()
    seconds = time.perf_counter() - started
    return {"steps": output.global_step, "seconds": seconds,
            "steps_per_s": output.global_step / seconds, "peak_rss_mb": peak_rss_mb()}


def worker(kind: str, folder: Path) -> None:
    result = run_ours(folder) if kind == "ours" else run_baseline(folder)
    print("RESULT " + json.dumps(result))


def spawn(kind: str, folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.trainer_bench", "--worker", kind,
                           str(folder)], capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="switchboard-trainer-bench-"))
    write_data(folder)
    print("baseline: transformers.Trainer ...", flush=True)
    baseline = spawn("hf", folder)
    print("this trainer ...", flush=True)
    ours = spawn("ours", folder)
    ratio = ours["steps_per_s"] / baseline["steps_per_s"]
    payload = {
        "workload": {"model": "default (SmolLM2-135M-Instruct), fp32", "rows": BATCH * STEPS,
                     "batch_size": BATCH, "steps": STEPS, "warmup_steps": WARMUP,
                     "lora": "rank 8, alpha 16, q_proj+v_proj", "prompt_masked": True},
        "ours": ours, "baseline_hf_trainer": baseline,
        "steps_per_s_vs_baseline": target(ratio, 1.2),
        "peak_rss_ratio_vs_baseline": round(ours["peak_rss_mb"] / baseline["peak_rss_mb"], 3),
    }
    path = write_results("trainer", payload)
    profile = ours["profile_ms_per_step"]
    print_table(f"trainer benchmark -> {path}", [
        ("steps/s this trainer", f"{ours['steps_per_s']:.3f}"),
        ("steps/s transformers.Trainer", f"{baseline['steps_per_s']:.3f}"),
        ("ratio", f"{ratio:.2f} (target >= 1.2)"),
        ("peak RSS this / baseline", f"{ours['peak_rss_mb']:.0f} / "
                                     f"{baseline['peak_rss_mb']:.0f} MB"),
        *[(f"profile: {k}", f"{v} ms/step") for k, v in profile.items()],
    ])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
