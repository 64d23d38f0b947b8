"""Model families: what makes Llama, Mistral and Qwen2 differ, one file per family (``llama.py``, ...).

``registry.py`` finds the families and answers which one a config belongs to; ``dims.py`` reads a
block's dimensions from a config. Adding a family is one file here (a module defining ``FAMILY``)
and its tiny model in ``tests/tiny_models.py``.
"""
