"""Differential LoRA training: per-worker loop, DeepSpeed config, TorchTrainer launch."""
