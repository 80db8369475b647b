"""Cost of one SAM step against a plain SGD step and against a per-parameter-loop SAM.

Baselines, all measured in this run on the same model, batch and thread count:
- `sgd`: one forward/backward and `torch.optim.SGD.step` (the floor SAM doubles);
- `m8` is m-sharpness with 8 groups on the default path for the device, `m8_vmap` forces the
  batched `torch.func.vmap` path (the default on accelerators; on a CPU it pays where a group's
  work is too small to keep a core busy, e.g. the embedded study's CNN on 8x8 digits, `cnn_small/`);
- `loop_reference`: SAM as popular single-file implementations write it: a Python loop over
  parameters with a `clone()` of every weight each step and `p.add_(e)` / `p.data = old`.
  `optimizer_work` times the part where the two differ alone (first step, restore, base step
  on fixed gradients), since on a ResNet it is under 1% of a step and the whole-step ratio
  moves by more than that from run to run.

Prints one `name: value` line per figure and ends with
`ratios: sam/sgd=X.XX m8/sam=Y.YY sam/loop_reference=Z.ZZ` (the ResNet figures; targets:
sam/sgd <= 2.05, m8/sam <= 1.3, sam/loop_reference <= 1.0).

    python benchmarks/sam_step.py [--batch 128] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from samtune.models.zoo import build_model
from samtune.optim.sam import SAM
from samtune.optim.step import sam_step


class LoopReferenceSAM(torch.optim.Optimizer):
    """The straightforward SAM: per-parameter Python loops and a clone per weight per step."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale)
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


def loop_reference_step(model, x, y, opt):
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.second_step()


def time_steps(step, repeats: int, warmup: int = 2) -> float:
    """Median seconds per step; the median keeps one slow outlier from moving the ratio."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def optimizer_work(model_name: str, shape, batch: int, repeats: int) -> dict[str, float]:
    """Seconds of one SAM step's optimizer work alone (first step, restore, base step) for
    samtune's SAM and the loop reference, on fixed gradients: the part of a step the two
    implementations differ in, without the two passes' forward/backward noise around it."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    out = {}
    for name, make in (
        ("sam", lambda ps: SAM(ps, rho=0.05, **kwargs)),
        ("loop_reference", lambda ps: LoopReferenceSAM(ps, torch.optim.SGD, rho=0.05, **kwargs)),
    ):
        torch.manual_seed(0)
        model = build_model(model_name, 10, shape)
        opt = make(model.parameters())
        F.cross_entropy(model(x), y).backward()
        params = list(model.parameters())
        grads = [p.grad.clone() for p in params]

        def step(opt=opt, params=params, grads=grads):
            for p, g in zip(params, grads):
                p.grad = g
            opt.first_step()
            for p, g in zip(params, grads):
                p.grad = g
            opt.second_step()

        out[name] = min(time_steps(step, repeats * 20) for _ in range(3))
    return out


def measure(model_name: str, shape, batch: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    def fresh():
        torch.manual_seed(0)
        return build_model(model_name, 10, shape)

    sgd_model, sam_model, m8_model, vmap_model, loop_model = fresh(), fresh(), fresh(), fresh(), fresh()
    sgd = torch.optim.SGD(sgd_model.parameters(), **kwargs)
    sam = SAM(sam_model.parameters(), rho=0.05, **kwargs)
    m8 = SAM(m8_model.parameters(), rho=0.05, **kwargs)
    m8_vmap = SAM(vmap_model.parameters(), rho=0.05, **kwargs)
    loop = LoopReferenceSAM(loop_model.parameters(), torch.optim.SGD, rho=0.05, **kwargs)
    # Interleave the contenders round by round so drift in machine load hits all of them alike.
    steps = {
        "sgd": lambda: sam_step(sgd_model, F.cross_entropy, x, y, sgd),
        "sam": lambda: sam_step(sam_model, F.cross_entropy, x, y, sam),
        "m8": lambda: sam_step(m8_model, F.cross_entropy, x, y, m8, m=batch // 8),
        "m8_vmap": lambda: sam_step(vmap_model, F.cross_entropy, x, y, m8_vmap, m=batch // 8, vectorize=True),
        "loop_reference": lambda: loop_reference_step(loop_model, x, y, loop),
    }
    rounds = {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            rounds[name].append(time_steps(step, repeats))
    return {name: min(values) for name, values in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}")
    print(f"batch: {args.batch}")
    results = {}
    # The embedded study's CNN on 8x8 digits at its batch of 64, where m = 8 is 8 groups too.
    for model_name, shape, batch in [
        ("mlp", (3, 32, 32), args.batch),
        ("resnet20", (3, 32, 32), args.batch),
        ("cnn_small", (1, 8, 8), 64),
    ]:
        t = measure(model_name, shape, batch, args.repeats)
        results[model_name] = t
        for name, seconds in t.items():
            print(f"{model_name}/{name}_step_ms: {seconds * 1e3:.2f}")
        print(f"{model_name}/sam/sgd: {t['sam'] / t['sgd']:.2f}")
        print(f"{model_name}/m8/sam: {t['m8'] / t['sam']:.2f}")
        print(f"{model_name}/m8_vmap/m8: {t['m8_vmap'] / t['m8']:.2f}")
        print(f"{model_name}/sam/loop_reference: {t['sam'] / t['loop_reference']:.2f}")
        work = optimizer_work(model_name, shape, batch, args.repeats)
        print(
            f"{model_name}/optimizer_work_ms: sam={work['sam'] * 1e3:.3f} "
            f"loop_reference={work['loop_reference'] * 1e3:.3f}"
        )
        print(f"{model_name}/optimizer_work/loop_reference: {work['sam'] / work['loop_reference']:.2f}")
    r = results["resnet20"]
    print(
        f"ratios: sam/sgd={r['sam'] / r['sgd']:.2f} m8/sam={r['m8'] / r['sam']:.2f} "
        f"sam/loop_reference={r['sam'] / r['loop_reference']:.2f}"
    )


if __name__ == "__main__":
    main()
