"""Scale-out on torch.distributed under torchrun: the process group (group.py) and tensor
parallelism for inference (tensor.py). The Trainer's side, DDP/FSDP2 and sharded checkpoints, is
zerolm/train/parallel.py and zerolm/train/sharded.py."""
