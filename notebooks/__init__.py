"""The student tutorials (package data: each ``NAME.ipynb`` is what students open, its paired
percent-format ``NAME.py`` is what people edit)."""
