"""The papermill templates researchers run with ``medzone run NAME`` (package data: each
``NAME.ipynb`` is executed, its paired percent-format ``NAME.py`` is what people edit)."""
