"""Benchmarks and result generators (not installed with the library).

Most are scripts run as files (``python benchmarks/overhead.py``). Those that reuse the
test fixtures of ``tests/clients.py`` run as modules from the repository root, so that
``tests`` is importable without touching ``sys.path``
(``python -m benchmarks.resolved_layers``).
"""
