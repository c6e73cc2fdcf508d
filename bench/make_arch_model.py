"""Build a randomly initialised model with a given model's architecture and tokenizer.

The CUDA machine cannot receive the default model's weights (the 98 MB GGUF is over
the device tool's 64 MiB transfer limit), but throughput and the LoRA oracle depend
on the architecture, not on the weight values. This builds SmolLM2-135M's exact
architecture with random weights from its config.json and tokenizer files.

    python -m bench.make_arch_model SRC_FOLDER DST_FOLDER
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    print(f"random {config.model_type} with {model.num_parameters():,} parameters -> {target}")


if __name__ == "__main__":
    main()
