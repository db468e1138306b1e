"""zsl_utils: the small library behind the ConSE and HUSE notebooks.

Notebooks import modules from here (``from zsl_utils import conse, wordnet``); see
``docs/ARCHITECTURE.md`` for what each module holds.
"""
__version__ = "0.1.0"
