"""What a training run will read and write, settled before torch is imported.

``switchboard train`` checks its config and its data (files found, columns, encoding,
non-empty rows) and says which adapter it trains and where it will publish it before it
loads torch or a model: a wrong path costs a second, not the twenty it takes to load
them, and nothing is published anywhere a user did not see announced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainConfig
from trainer.rows import Row, data_digest, read_rows, split


@dataclass(frozen=True)
class RunPlan:
    train_rows: list[Row]
    val_rows: list[Row]
    data_files: list[Path]
    data_digest: str
    base_model: str
    """``default`` or the resolved path of the base model."""
    init_from: Path | None
    resume_from: Path | None
    output: Path
    publish_to: Path | None
    """``<publish_root>/<name>``, or None when the run does not publish."""

    def describe(self, name: str) -> str:
        """One line for the user, printed before training starts."""
        target = f"publishes to {self.publish_to}" if self.publish_to else "not published"
        return (f"training adapter '{name}' on {len(self.train_rows)} rows "
                f"({len(self.val_rows)} for validation); output in {self.output}; {target}")


def plan_run(config: TrainConfig, publish: bool = True) -> RunPlan:
    """Resolve every input (an error names each place tried) and read the data."""
    data_file = config.input_path("metadata_path", data=True)
    rows = read_rows(data_file)
    files = [data_file]
    if config.val_path:
        val_file = config.input_path("val_path", data=True)
        train_rows, val_rows = rows, read_rows(val_file)
        files.append(val_file)
    else:
        train_rows, val_rows = split(rows, config.val_split, config.seed)
    base = config.base_model
    if base != "default":
        base = str(config.input_path("base_model"))
    return RunPlan(
        train_rows=train_rows, val_rows=val_rows, data_files=files,
        data_digest=data_digest(files), base_model=base,
        init_from=config.input_path("init_from") if config.init_from else None,
        resume_from=config.input_path("resume_from") if config.resume_from else None,
        output=config.output_path, publish_to=config.publish_path if publish else None)
