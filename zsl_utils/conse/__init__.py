"""ConSE (Norouzi et al., ICLR 2014): the model and ImageNet zero-shot evaluation."""
