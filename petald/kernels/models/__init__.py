"""Model families: how each departs from a Llama-shaped decoder, one file per family (``llama.py``, ...).

``registry.py`` finds the families and answers which one a config belongs to; ``dims.py`` reads a
block's dimensions from a config; ``features.py`` refuses, by name, what a config asks for that petald
does not implement. Adding a family is one file here (a module defining ``FAMILY``) and its tiny model
in ``tests/tiny_models.py``; docs/models.md lists them and what was checked for each.
"""
