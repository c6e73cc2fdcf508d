"""Switchboard trainer: one YAML config and a CSV in, a PEFT LoRA adapter out.

It loads the base model with :func:`server.basemodel.load_base_model` and builds prompts
with :func:`server.formats.build_prompt`, the same code the server uses.
"""
