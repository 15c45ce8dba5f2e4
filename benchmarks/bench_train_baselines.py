"""MIL baselines: parameters and time of one training step (forward + backward + AdamW) per slide.

Runs every baseline at the papers' sizes (config/methods/*.yaml) and at the demo's sizes
(config.yaml train.model_kwargs) on random bags of ``--tiles`` tiles of ``--dim``-d features,
and prints a table. A demo train job costs about epochs x training slides x this step time,
plus the start-up of the process (importing torch and pandas).

    python benchmarks/bench_train_baselines.py                     # demo-like: 300 tiles, 1024-d
    python benchmarks/bench_train_baselines.py --tiles 10000 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from tabulate import tabulate

from mambapath.config import CONFIG_DIR, load_config
from mambapath.models import Bag, create_model
from mambapath.train import AdamW, load_method

METHODS = ["mean_mil", "max_mil", "abmil", "transmil", "ilra_mil"]


def step_seconds(model, bag: Bag, repeats: int, device) -> float:
    optimizer = AdamW(model.parameters(), weight_decay=1e-2)
    target = torch.tensor([1], device=device)

    def one_step():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(bag), target)
        loss.backward()
        optimizer.step(1e-4)

    one_step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=300)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config(CONFIG_DIR / "config.yaml")
    demo_kwargs = config["train"].get("model_kwargs") or {}
    bag = Bag.single(torch.randn(args.tiles, args.dim)).to(device)
    rows = []
    for name in METHODS:
        method = load_method(name)
        for size, kwargs in (("paper", method["kwargs"]), ("demo", {**method["kwargs"], **demo_kwargs.get(name, {})})):
            if size == "demo" and name not in demo_kwargs:
                continue
            torch.manual_seed(0)
            model = create_model(method["model"], in_dim=args.dim, n_outputs=args.classes, **kwargs).to(device)
            model.train()
            n_params = sum(p.numel() for p in model.parameters())
            seconds = step_seconds(model, bag, args.repeats, device)
            rows.append([method["display_name"], size, f"{n_params:,}", f"{1000 * seconds:.1f}"])
    print(f"{args.tiles} tiles x {args.dim}-d, {args.classes} outputs, device {device}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(tabulate(rows, headers=["method", "size", "parameters", "ms / training step"], tablefmt="github"))


if __name__ == "__main__":
    main()
