"""The engine: batched multi-LoRA forward, continuous batching, sampling, streaming."""
