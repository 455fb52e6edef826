"""Fully sharded data-parallel training (FSDP2, `fully_shard`) on CPU with fastopt.torch.

    torchrun --nproc_per_node=2 examples/fsdp2_train.py                  # fastopt.torch.Adam
    torchrun --nproc_per_node=2 examples/fsdp2_train.py --optimizer SGD  # SGD with momentum
    torchrun --nproc_per_node=2 examples/fsdp2_train.py --check out.json # vs torch.optim

Under fully_shard every parameter is a DTensor whose local shard lives on one rank;
fastopt.torch updates that shard in place (zero copy), keeps its state as DTensors sharded like
the parameters, as torch.optim does, and works with torch.distributed.checkpoint's
get_optimizer_state_dict / set_optimizer_state_dict.

--check FILE trains the same model with torch.optim and fastopt.torch (Adam, AdamW and SGD with
momentum; float32 and float64), checks that a checkpoint taken mid-run resumes identically,
within one implementation and across the two, and writes the differences as JSON (rank 0).
"""
import argparse
import copy
import gc
import json
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import fastopt
import fastopt.torch

SETTINGS = {"Adam": dict(lr=1e-2), "AdamW": dict(lr=1e-2, weight_decay=0.05),
            "SGD": dict(lr=0.05, momentum=0.9)}


def make_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)  # each layer's parameters sharded across the ranks
    fully_shard(model)
    return model


def batch(step, dtype, rank, world, size=64):
    """This rank's share of the global batch of the step (the same data whatever the world)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(size, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (size,), generator=gen)
    per_rank = size // world
    return x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]


def train(model, opt, steps, dtype, start=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, start + steps):
        x, y = batch(step, dtype, rank, world)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()  # FSDP2 reduce-scatters the gradients: each rank gets its shard's
        opt.step()
    return loss.item()


def shards(model):
    return [p.to_local().detach().clone() for p in model.parameters()]


def worst_difference(a_model, b_model):
    """max over parameters of max |a - b| / max |a| on this rank's shards, over all ranks."""
    worst = 0.0
    for a, b in zip(shards(a_model), shards(b_model)):
        if a.numel():
            worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item())
    value = torch.tensor(worst, dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def run(impl, name, dtype, steps):
    model = make_model(dtype)
    opt = getattr(impl, name)(model.parameters(), **SETTINGS[name])
    train(model, opt, steps, dtype)
    return model, opt


def resume(impl, name, dtype, model, opt, steps, start):
    """A fresh model and an `impl` optimizer loaded from model's and opt's checkpoint."""
    # copies, as a checkpoint on disk would be: torch.optim's state dict holds its live
    # buffers, which the loading optimizer would otherwise share with it
    model_state = copy.deepcopy(get_model_state_dict(model))
    optim_state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    fresh = make_model(dtype)
    fresh_opt = getattr(impl, name)(fresh.parameters(), **SETTINGS[name])
    set_model_state_dict(fresh, model_state)
    set_optimizer_state_dict(fresh, fresh_opt, optim_state)
    train(fresh, fresh_opt, steps, dtype, start=start)
    return fresh, fresh_opt


def check(steps):
    report = {}
    for name in SETTINGS:
        for dtype in (torch.float32, torch.float64):
            key = f"{name}-{str(dtype).split('.')[-1]}"
            ours, our_opt = run(fastopt.torch, name, dtype, steps)
            theirs, their_opt = run(torch.optim, name, dtype, steps)
            state_like_torch = all(
                type(our_opt.state[p][k]) is type(v)
                and getattr(our_opt.state[p][k], "placements", None) == getattr(v, "placements", None)
                for p, q in zip(ours.parameters(), theirs.parameters())
                for k, v in their_opt.state[q].items())
            entry = {"vs_torch": worst_difference(theirs, ours), "state_like_torch": state_like_torch}
            # a checkpoint after `steps`: resumed in a fresh model for 10 steps against the
            # original continuing, within fastopt.torch and from torch.optim into fastopt.torch
            resumed, _ = resume(fastopt.torch, name, dtype, ours, our_opt, 10, steps)
            from_torch, _ = resume(fastopt.torch, name, dtype, theirs, their_opt, 10, steps)
            train(ours, our_opt, 10, dtype, start=steps)
            train(theirs, their_opt, 10, dtype, start=steps)
            entry["resumed_vs_continued"] = worst_difference(ours, resumed)
            entry["from_torch_vs_torch_continued"] = worst_difference(theirs, from_torch)
            report[key] = entry
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", choices=sorted(SETTINGS), default="Adam")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--check", metavar="FILE", help="compare with torch.optim, write JSON")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds a collective may wait before gloo gives up")
    args = ap.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    torch.set_num_threads(1)
    fastopt.set_num_threads(1)  # one core per rank
    try:
        if args.check:
            report = check(args.steps)
            if dist.get_rank() == 0:
                with open(args.check, "w") as f:
                    json.dump(report, f, indent=1)
        else:
            model = make_model(torch.float32)
            opt = getattr(fastopt.torch, args.optimizer)(model.parameters(),
                                                         **SETTINGS[args.optimizer])
            loss = train(model, opt, args.steps, torch.float32)
            if dist.get_rank() == 0:
                print(f"{args.optimizer}: loss after {args.steps} steps {loss:.4f}", flush=True)
            del model, opt
        # the models and their collectives' Python objects go before the process group, so
        # that gloo's threads are not torn down at interpreter exit (see examples/ddp_train.py)
        gc.collect()
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
