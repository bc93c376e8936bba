"""Benchmarks: NeFT vs LoRA vs full fine-tuning (run `python -m benchmarks.compare --help`)."""
