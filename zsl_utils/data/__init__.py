"""Datasets and assets: WordNet, Tux Paint, ImageNet WNID lists, image folders, Food-101."""
