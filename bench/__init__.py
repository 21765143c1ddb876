"""Benchmarks and the model zoo; run each as a script (``python bench/zoo.py``)."""
