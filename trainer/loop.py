"""The training loop: AdamW with linear warmup and decay, gradient accumulation,
validation, checkpoints with exact resume, early stopping on the best validation loss.

A checkpoint (``<output>/checkpoints/step-N``) holds the adapter, the optimizer, the
scheduler, the RNG states and the position in the data; the data order of an epoch is a
function of ``seed`` and the epoch alone, so a resumed run replays exactly what the
uninterrupted run would have done (tested: equal weights within 1e-6 on the CPU).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm import tqdm

from server.errors import InvalidOption
from trainer.config import TrainConfig
from trainer.data import Example, collate, length_grouped_batches
from trainer.model import label_loss

STATE_FILE = "trainer_state.pt"


@dataclass
class Progress:
    """Everything about where a run is, saved with each checkpoint."""

    step: int = 0
    epoch: int = 0
    group: int = 0
    """Optimizer steps already taken within ``epoch``."""
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    stopped_early: bool = False


@dataclass
class LoopResult:
    progress: Progress
    total_steps: int
    seconds: float
    best_dir: Path | None


def trainable(model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _groups(config: TrainConfig, examples: list[Example], epoch: int) -> list[list[list[int]]]:
    batches = length_grouped_batches(examples, config.batch_size, config.seed + epoch)
    return [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]


def _scheduler(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float
               ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def validation_loss(model: PeftModel, examples: list[Example], batch_size: int,
                    pad_id: int) -> float:
    """Token-weighted mean loss over ``examples`` (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        loss, n = label_loss(model, batch)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def run_key(config: TrainConfig, train: list[Example]) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint, so that it
    replays the same batches under the same schedule."""
    return {"batch_size": config.batch_size, "grad_accum": config.grad_accum,
            "epochs": config.epochs, "seed": config.seed, "train_rows": len(train),
            "learning_rate": config.learning_rate, "warmup_ratio": config.warmup_ratio}


def save_checkpoint(folder: Path, model: PeftModel, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, key: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    torch.save({
        "run_key": key,
        "progress": asdict(progress), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }, folder / STATE_FILE)


def load_checkpoint(folder: Path, model: PeftModel, optimizer: torch.optim.Optimizer,
                    scheduler: Any, key: dict[str, Any]) -> Progress:
    state_path = folder / STATE_FILE
    weights = folder / "adapter_model.safetensors"
    if not state_path.exists() or not weights.exists():
        raise InvalidOption(f"resume_from: {folder} is not a checkpoint "
                            f"(needs {STATE_FILE} and adapter_model.safetensors)")
    state = torch.load(state_path, weights_only=False)  # our own file, written above
    saved_key = state.get("run_key", {})
    changed = sorted(k for k in key if saved_key.get(k) != key[k])
    if changed:
        raise InvalidOption(
            f"resume_from: the checkpoint was written with different {', '.join(changed)} "
            f"({', '.join(f'{k}={saved_key.get(k)}' for k in changed)}); an exact resume "
            "needs the same settings and data")
    set_peft_model_state_dict(model, load_file(weights))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    saved = state["progress"]
    saved["train_losses"] = [tuple(x) for x in saved["train_losses"]]
    saved["val_losses"] = [tuple(x) for x in saved["val_losses"]]
    return Progress(**saved)


def train_loop(config: TrainConfig, model: PeftModel, train: list[Example],
               val: list[Example], pad_id: int, quiet: bool = False,
               resume_from: Path | None = None) -> LoopResult:
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train) / config.batch_size) / config.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    scheduler = _scheduler(optimizer, total_steps, config.warmup_ratio)
    progress = Progress()
    if resume_from is not None:
        progress = load_checkpoint(resume_from, model, optimizer, scheduler,
                                   run_key(config, train))
    output = config.output_path
    best_dir = output / "best"
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=progress.step, disable=quiet, unit="step",
               dynamic_ncols=True)

    def evaluate() -> bool:
        """Validation loss; True when early stopping says stop."""
        if not val:
            return False
        loss = validation_loss(model, val, config.batch_size, pad_id)
        progress.val_losses.append((progress.step, loss))
        if loss < progress.best_val:
            progress.best_val, progress.best_step, progress.evals_since_best = \
                loss, progress.step, 0
            model.save_pretrained(str(best_dir))
        else:
            progress.evals_since_best += 1
        patience = config.early_stopping_patience
        return bool(patience and progress.evals_since_best >= patience)

    while progress.step < total_steps and not progress.stopped_early:
        groups = _groups(config, train, progress.epoch)
        for group in groups[progress.group:]:
            optimizer.zero_grad(set_to_none=True)
            batches = [collate([train[i] for i in batch], pad_id) for batch in group]
            tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                loss, count = label_loss(model, batch)
                (loss * (count / tokens)).backward()  # token-weighted over the group
                step_loss += float(loss.detach()) * count / tokens
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            progress.step += 1
            progress.group += 1
            progress.train_losses.append((progress.step, step_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if config.eval_every and progress.step % config.eval_every == 0 and evaluate():
                progress.stopped_early = True  # before the save: a resume must see it
            if config.save_steps and progress.step % config.save_steps == 0:
                save_checkpoint(output / "checkpoints" / f"step-{progress.step}", model,
                                optimizer, scheduler, progress, run_key(config, train))
            if progress.stopped_early or progress.step >= total_steps:
                break
        else:
            progress.epoch += 1
            progress.group = 0
            if not config.eval_every and evaluate():
                progress.stopped_early = True
            continue
        break
    if val and (not progress.val_losses or progress.val_losses[-1][0] != progress.step):
        evaluate()  # a final validation point when the last step was not evaluated
    bar.close()
    save_checkpoint(output / "checkpoints" / f"step-{progress.step}", model, optimizer,
                    scheduler, progress, run_key(config, train))
    has_best = val and progress.best_step >= 0 and (best_dir / "adapter_model.safetensors").exists()
    return LoopResult(progress, total_steps, time.perf_counter() - started,
                      best_dir if has_best else None)
