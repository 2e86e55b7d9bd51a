"""Benchmarks: ``bench/train.py`` (training vs diffusers' script) and ``bench/generate.py``."""
