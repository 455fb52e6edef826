"""The sparse-row cases of `python -m fastopt bench` (alone: python -m fastopt.bench_sparse).

An embedding table of 1M x 64 float32 (nn.Embedding(sparse=True)), a batch of 16,384 indices
drawn Zipf(1.2) (a few thousand distinct rows, most of the batch on a few) or uniform; each
timed call is step() alone on a fresh gradient from the embedding's backward (gradients made
beforehand, uncoalesced, as backward leaves them).  Every fastopt.torch class that takes
sparse gradients against torch's (default hyperparameters); the numpy SparseGrad step of
fastopt.<IN_LOOP_RULE> against a dense step of it over the whole table.  Interleaved rounds, medians (fastopt.benchmark.time_side_by_side).
"""
import sys

import numpy as np

import fastopt
from fastopt.benchmark import IN_LOOP_RULE, section_main, time_side_by_side

ROWS, DIM, BATCH = 1_000_000, 64, 16_384
GRADIENTS = 8  # distinct batches, used in turn



def draw_indices(distribution, rng, rows=ROWS, batch=BATCH):
    """One batch of row indices: Zipf(1.2) ranks (ranks past the table drawn again) mapped to
    rows by a fixed permutation, so the hot rows are scattered over the table; or uniform."""
    if distribution == "uniform":
        return rng.integers(0, rows, size=batch)
    ranks = rng.zipf(1.2, size=batch)
    while (ranks > rows).any():
        over = ranks > rows
        ranks[over] = rng.zipf(1.2, size=int(over.sum()))
    return _scatter(rows)[ranks - 1]


_SCATTERS = {}


def _scatter(rows):
    if rows not in _SCATTERS:
        _SCATTERS[rows] = np.random.default_rng(1).permutation(rows)
    return _SCATTERS[rows]


def torch_runners(name, distribution, threads, hp):
    """{"fastopt.torch": step, "torch": step}: each call puts the next of GRADIENTS prepared
    sparse gradients (from the embedding's backward) on the weight and steps."""
    import torch
    import fastopt.torch as ft
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(draw_indices(distribution, rng)) for _ in range(GRADIENTS)]
    out, distinct = {}, int(np.mean([len(np.unique(b.numpy())) for b in batches]))
    for label, module, cls in (("fastopt.torch", ft, name), ("torch", torch.optim, against(name))):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
        grads = []
        for b in batches:
            emb.zero_grad()
            (emb(b) * 1e-3).sum().backward()
            grads.append(emb.weight.grad)
        opt = getattr(module, cls)(emb.parameters(), **hp)
        turn = [0]

        def step(emb=emb, opt=opt, grads=grads, turn=turn):
            turn[0] = (turn[0] + 1) % len(grads)
            emb.weight.grad = grads[turn[0]]
            opt.step()
        out[label] = step
    return out, distinct


def numpy_runners(distribution):
    """numpy: the in-loop rule's optimizer stepping a SparseGrad of the batch against the same
    stepping the whole table densely (what a dense optimizer does with an embedding)."""
    rng = np.random.default_rng(0)
    grads = []
    for _ in range(GRADIENTS):
        indices = draw_indices(distribution, rng)
        grads.append(fastopt.SparseGrad(indices, np.full((BATCH, DIM), 1e-3, np.float32)))
    table = np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32)
    cls = getattr(fastopt, IN_LOOP_RULE)
    sparse_opt = cls([table])
    dense_table = table.copy()
    dense_grad = np.full_like(dense_table, 1e-3)
    dense_opt = cls([dense_table])
    turn = [0]

    def sparse_step():
        turn[0] = (turn[0] + 1) % GRADIENTS
        sparse_opt.step([grads[turn[0]]])
    return {"SparseGrad": sparse_step, "dense": lambda: dense_opt.step([dense_grad])}


def against(name):
    """The torch.optim class a fastopt.torch class is compared with: its namesake, or where
    torch has none, the one it names (`bench_against`)."""
    import fastopt.torch as ft
    return getattr(getattr(ft, name), "bench_against", name)


def torch_cases():
    """The fastopt.torch classes that take sparse gradients (they say how: sparse_grads)."""
    import fastopt.torch as ft
    return [name for name in ft.__all__ if isinstance(getattr(ft, name), type)
            and issubclass(getattr(ft, name), ft._Fastopt)
            and getattr(ft, name).sparse_grads is not ft._Fastopt.sparse_grads]


def run(threads, quick=False, budget_s=1.0):
    """Prints the sparse table; returns its rows (dicts) for --json."""
    results = []
    print(f"\nSparse rows: {ROWS:,} x {DIM} float32 table, {BATCH:,} indices per step, "
          f"{threads} threads; step() alone on fresh gradients (us, medians of interleaved rounds)")
    print(f"{'case':<26}{'indices':>9}{'rows':>7} {'fastopt':>10} {'other':>10} {'ratio':>8}")
    fastopt.set_num_threads(threads)
    distributions = ["zipf"] if quick else ["zipf", "uniform"]
    for distribution in distributions:
        try:
            import torch  # noqa: F401
        except ImportError:
            torch = None
        if torch is not None:
            for name in torch_cases():
                fns, distinct = torch_runners(name, distribution, threads, {})
                t = time_side_by_side(fns, budget_s * 2)
                ratio = t["torch"] / t["fastopt.torch"]
                label = f"torch {name}" + (f" ({against(name)})" if against(name) != name else "")
                print(f"{label:<26}{distribution:>9}{distinct:>7} "
                      f"{t['fastopt.torch'] * 1e6:>10.0f} {t['torch'] * 1e6:>10.0f} "
                      f"{ratio:>7.2f}x", flush=True)
                results.append(dict(sparse=True, case=f"torch {name}", distribution=distribution,
                                    rows=distinct, times=t, ratio=ratio))
                del fns
        t = time_side_by_side(numpy_runners(distribution), budget_s * 2)
        ratio = t["dense"] / t["SparseGrad"]
        case = f"numpy {IN_LOOP_RULE} SparseGrad"
        print(f"{case:<26}{distribution:>9}{'':>7} {t['SparseGrad'] * 1e6:>10.0f} "
              f"{t['dense'] * 1e6:>10.0f} {ratio:>7.1f}x", flush=True)
        results.append(dict(sparse=True, case=case, distribution=distribution, times=t,
                            ratio=ratio))
    print(f"other: torch.optim's class of the same name, or the one in parentheses (numpy: a dense "
          f"fastopt.{IN_LOOP_RULE} step over the whole table); ratio: other / fastopt (targets: "
          "README, \"Sparse rows\")")
    return results


def main(argv=None):
    return section_main("fastopt.bench_sparse", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
