"""Data-parallel training on CPU with fastopt.torch: DistributedDataParallel (gloo), and
optionally ZeroRedundancyOptimizer sharding the optimizer state across ranks.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # DDP + fastopt.torch.Adam
    torchrun --nproc_per_node=2 examples/ddp_train.py --zero     # + ZeroRedundancyOptimizer

Trains a small MLP to classify two interleaved spirals; every rank sees its own half of each
batch.  --out FILE writes the final parameters (rank 0: FILE, rank 1: FILE.1, ...), which the
tests compare with a single-process run on the whole batches.
"""
import argparse
import gc
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastopt.torch


def spirals(n, seed):
    """n points of two interleaved spirals, labels 0/1 (the same for every rank)."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.5, 3 * np.pi, n)
    label = rng.integers(0, 2, n)
    r = t / (3 * np.pi)
    angle = t + np.pi * label
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + rng.normal(0, 0.02, (n, 2))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(label)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                               torch.nn.Tanh(), torch.nn.Linear(64, 2))


def batches(steps, batch):
    for step in range(steps):
        yield spirals(batch, seed=step)


def train(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    fastopt.set_num_threads(1)  # one core per rank
    model = DistributedDataParallel(make_model())
    if args.zero:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastopt.torch.Adam,
                                      lr=args.lr)
    else:
        opt = fastopt.torch.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    per_rank = args.batch // world
    for step, (x, y) in enumerate(batches(args.steps, args.batch)):
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()  # DDP averages the gradients across ranks
        opt.step()
        sched.step()
        if rank == 0 and (step + 1) % 50 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}", flush=True)
    if args.out:
        path = args.out if rank == 0 else f"{args.out}.{rank}"
        torch.save([p.detach().clone() for p in model.module.parameters()], path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="global batch, split across ranks")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--zero", action="store_true", help="shard optimizer state (ZeRO-1)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds a collective may wait for the other ranks before it raises")
    args = ap.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    try:
        train(args)
        # DDP's reducer must not be the last owner of the process group: the owner that lets
        # it go runs its destructor, which joins gloo's worker threads.  The reducer does that
        # holding the GIL, while a worker may need the GIL to free the last allreduce (which
        # keeps the Python context backward() stashed): the two wait for each other forever
        # (1 exit in 6 hung on this project's VMs).  So the model goes first, here, and
        # destroy_process_group() lets the group go without holding the GIL.
        gc.collect()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
