"""Wall time of one forward + backward of a 576x1536 Linear on 8x128 tokens: plain nn.Linear (weight trainable),
DeltaLinear with a LoRA-r16-sized budget (window closed and open), and a peft LoRA r=16 on a frozen Linear.

    python scripts/bench_sparse_delta_linear.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.selection import WindowStats

IN, OUT, TOKENS, RANK = 576, 1536, (8, 128), 16


def once(module: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(x).sum().backward()
    seconds = time.perf_counter() - start
    for p in module.parameters():
        p.grad = None
    return seconds


def timed(variants: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per variant, the variants interleaved round by round so a load spike hits all alike."""
    for module in variants.values():
        once(module, x)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, module in variants.items():
            samples[name].append(once(module, x))
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.5)  # 50% pruned
    x = torch.randn(*TOKENS, IN, requires_grad=True)
    k = RANK * (IN + OUT)

    delta = DeltaLinear(copy.deepcopy(linear), k, torch.float32)
    with torch.no_grad():
        delta.indices.copy_(torch.randperm(IN * OUT)[:k].to(torch.int32))
    windowed = DeltaLinear(copy.deepcopy(linear), k, torch.float32)
    windowed.indices.copy_(delta.indices)
    windowed.observer = WindowStats(k, (OUT, IN), torch.device("cpu"))

    from peft import LoraConfig, get_peft_model

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = copy.deepcopy(linear)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.proj(t)

    lora = get_peft_model(Wrapper(), LoraConfig(r=RANK, lora_alpha=32, target_modules=["proj"]))
    variants = {
        "nn.Linear (dense weight grad)": linear,
        f"DeltaLinear k={k}": delta,
        f"DeltaLinear k={k}, window open": windowed,
        f"peft LoRA r={RANK}": lora,
    }
    rows = timed(variants, x, args.repeats)
    base = rows["nn.Linear (dense weight grad)"]
    for name, seconds in rows.items():
        print(f"{name:40s} {seconds * 1e3:8.2f} ms  {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
