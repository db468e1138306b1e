"""Scale-out plumbing: torchrun launcher, distributed extraction, DDP training.

Run from the command line (docs/DISTRIBUTED.md); never imported by a notebook or the core."""
