#!/usr/bin/env python
"""CPU levers for the fast CNN recipe: images/s of one training step of the airbench-class net
(forward + backward + Nesterov SGD step, 256 random 32 px images) in fp32 / bf16 autocast, with
and without ``channels_last``, measured one after the other in one process (compare the ratios).

    python scripts/bench_cnn_levers.py [--model airbench] [--batch 256] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backmix_vlm.runtime import machine_line  # noqa: E402
from backmix_vlm.models.cnn import create_cnn  # noqa: E402


def main() -> None:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="airbench")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    for channels_last in (False, True):
        for precision in ("fp32", "bf16"):
            model = create_cnn(a.model, 10).train()
            x, y = torch.randn(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))
            if channels_last:
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1, momentum=0.9,
                                  nesterov=True)

            def step() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(x)
                loss = torch.nn.functional.cross_entropy(out.logits.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()  # warm-up
            start = time.perf_counter()
            for _ in range(a.steps):
                step()
            rate = a.batch * a.steps / (time.perf_counter() - start)
            print(f"{a.model} channels_last={channels_last} {precision}: {rate:.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
