"""minilm's benchmark suite: speed and quality side by side with a baseline, in one run.

Run ``python -m benchmarks --help``. Rows: 1 training throughput, 2 hardware utilisation, 3 generation,
4 LoRA fine-tuning, 5 quality at equal compute, 6 pipeline overhead, 7 serving, 8 llama.cpp, 9 time to
quality, 10 data throughput. Results go to ``benchmarks/results.json`` and ``benchmarks/results.md``.
"""
