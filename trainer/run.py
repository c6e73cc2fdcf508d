"""One training run, end to end: data → model → loop → evaluation → publish."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from server.errors import InvalidOption
from trainer.config import TrainConfig
from trainer.data import encode
from trainer.evaluate import evaluate_run, plot_losses
from trainer.loop import train_loop
from trainer.model import load_for_training
from trainer.plan import RunPlan, plan_run
from trainer.publish import PublishResult, comparable_version, publish
from trainer.scale_choice import plot_scale_curve

log = logging.getLogger("switchboard.trainer")


@dataclass(frozen=True)
class RunResult:
    metrics: dict[str, float]
    adapter_dir: Path
    """The adapter that was evaluated (and published): the best by validation loss."""
    output_dir: Path
    published: PublishResult | None


def train(config: TrainConfig, plan: RunPlan | None = None, *, force: bool = False,
          quiet: bool = False) -> RunResult:
    """Train, evaluate and (when ``plan.publish_to`` is set) publish; see ``plan_run``."""
    started = time.perf_counter()
    plan = plan or plan_run(config, publish=False)
    torch.manual_seed(config.seed)  # LoRA initialisation is part of the seeded run
    base, model = load_for_training(config, plan)
    tokenizer = base.tokenizer
    train_set = encode(plan.train_rows, tokenizer, config.prompt_template,
                       config.max_seq_length, config.mask_prompt)
    val_set = encode(plan.val_rows, tokenizer, config.prompt_template, config.max_seq_length,
                     config.mask_prompt)
    dropped = train_set.dropped + val_set.dropped
    truncated = train_set.truncated + val_set.truncated
    if truncated:
        log.warning("%d rows were cut to max_seq_length=%d (their answers lose the end)",
                    truncated, config.max_seq_length)
    if dropped:
        log.warning("%d rows dropped: their prompt alone fills max_seq_length=%d",
                    dropped, config.max_seq_length)
    if not train_set.examples:
        raise InvalidOption(f"max_seq_length={config.max_seq_length} cuts the whole answer of "
                            f"every training row ({dropped} dropped); raise it")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    output = plan.output
    output.mkdir(parents=True, exist_ok=True)

    result = train_loop(config, model, train_set.examples, val_set.examples, pad_id, quiet,
                        plan.resume_from)
    progress = result.progress
    adapter_dir = output / "adapter"
    if result.best_dir is not None:  # evaluate and publish the best checkpoint
        set_peft_model_state_dict(model, load_file(result.best_dir / "adapter_model.safetensors"))
    model.save_pretrained(str(adapter_dir))

    metrics: dict[str, float] = {
        "train_loss_initial": progress.train_losses[0][1],
        "train_loss_final": progress.train_losses[-1][1],
        "steps": progress.step, "train_rows": len(train_set.examples),
        "val_rows": len(val_set.examples), "truncated_rows": truncated,
        "dropped_rows": dropped, "train_seconds": round(result.seconds, 2),
        "steps_per_s": round(progress.step / max(result.seconds, 1e-9), 3),
    }
    if progress.val_losses:
        metrics["val_loss_best"] = round(progress.best_val, 5)
        metrics["val_loss_final"] = round(progress.val_losses[-1][1], 5)
        metrics["best_step"] = progress.best_step
    eval_rows = [e.row for e in val_set.examples][: config.eval_samples]
    evaluation = None
    if eval_rows:
        # Training is over: the plain base goes to the engine that scores like make eval.
        rank = _max_rank(model)
        # The version this run would replace is scored in the same pass, at its own
        # scale: the gate compares like with like, never a figure recorded elsewhere.
        current = None
        if plan.publish_to is not None and comparable_version(
                plan.publish_to, base.base_fingerprint) is not None:
            current = plan.publish_to
        evaluation = evaluate_run(model.unload(), tokenizer, base.base_fingerprint,
                                  adapter_dir, eval_rows, config, rank,
                                  report=(lambda line: None) if quiet else _say,
                                  published=current)
        metrics.update(evaluation.metrics)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(output / "loss.png", progress.train_losses, progress.val_losses,
                f"{config.name}: {progress.step} steps")
    reports = ["metrics.json", "loss.png"]
    if evaluation is not None and evaluation.curve is not None:
        (output / "scale_curve.json").write_text(json.dumps(evaluation.curve, indent=2))
        plot_scale_curve(output / "scale.png", evaluation.curve,
                         f"{config.name}: validation chrF and retention by weight_scale")
        reports += ["scale_curve.json", "scale.png"]
    published = None
    if plan.publish_to is not None:
        published = publish(
            config, adapter_dir, base.base_fingerprint, metrics, plan.data_digest,
            plan.publish_to, force,
            weight_scale=evaluation.weight_scale if evaluation else None,
            retention_problem=evaluation.retention_problem if evaluation else None,
            published_score=evaluation.published if evaluation else None)
        if published.published:
            for name in reports:
                (published.folder / name).write_bytes((output / name).read_bytes())
    metrics["total_seconds"] = round(time.perf_counter() - started, 2)
    return RunResult(metrics, adapter_dir, output, published)


def _say(line: str) -> None:
    print(line, flush=True)


def _max_rank(model: PeftModel) -> int:
    """The largest rank of the trained LoRA (``r`` and any ``rank_pattern``)."""
    lora: Any = model.peft_config["default"]  # a LoraConfig
    return max([int(lora.r), *(int(r) for r in (lora.rank_pattern or {}).values())])


def summary_table(metrics: dict[str, Any]) -> str:
    keys = ["steps", "train_rows", "val_rows", "train_loss_initial", "train_loss_final",
            "val_loss_best", "val_chrf_base", "val_chrf_adapter", "val_bleu_base",
            "val_bleu_adapter", "weight_scale", "val_chrf", "control_mandarin_chrf_drop",
            "control_english_chrf_drop", "domain_perplexity_increase_pct",
            "perplexity_increase_pct", "truncated_rows",
            "dropped_rows", "steps_per_s", "total_seconds"]
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {metrics[k]:.4g}" if isinstance(metrics[k], float)
                     else f"{k:<{width}}  {metrics[k]}" for k in keys if k in metrics)
