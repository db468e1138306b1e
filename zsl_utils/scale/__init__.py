"""Scale-out plumbing (torchrun, distributed extraction, DDP): command line only, never imported by the core."""
