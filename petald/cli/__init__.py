"""The command line: ``petald serve``, ``petald generate``, ``petald demo``."""
