"""HUSE (Narayana et al., 2019): towers, losses, training and evaluation."""
