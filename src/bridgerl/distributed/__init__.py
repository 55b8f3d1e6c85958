"""Beyond one process: torchrun launch and FSDP2 sharding (launch.py, fsdp.py), DCP checkpoints
(checkpoint.py), and the Ray actor group that generator and reward workers share (actors.py).

Importing this package imports neither Ray nor torch.distributed's FSDP: a run that never asks for
ranks or workers never pays for them."""
