"""zsl_utils: the small library behind the ConSE and HUSE notebooks (module map: docs/ARCHITECTURE.md)."""
__version__ = "0.1.0"
