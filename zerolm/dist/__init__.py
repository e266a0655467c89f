"""Scale-out on torch.distributed under torchrun: the process group (group.py) and data
parallelism for the one Trainer, DDP or FSDP2 (parallel.py)."""
