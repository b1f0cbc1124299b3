"""Checkpoints: peft-format adapter directories, optimizer and trainer state, atomic writes."""
