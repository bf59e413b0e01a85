#!/usr/bin/env python
"""Airbench training step with and without glibc mmap for large blocks (docs/benchmarks.md §7).

    BACKMIX_VLM_MALLOC=default python scripts/bench_alloc_cnn.py glibc_default; python scripts/bench_alloc_cnn.py cli

Run each way in its own process; prints img/s and minor page faults per step.  The 2026-11-30 numbers
were taken before ``keep_freed_memory`` set ``M_MMAP_MAX = 0`` (both sides then had its 32 MiB mmap
threshold; the fast side added ``MALLOC_MMAP_MAX_=0``), so this re-run's baseline is plain glibc.
"""
import time, resource, torch, sys
from backmix_vlm.perf import keep_freed_memory
from backmix_vlm.models.cnn import create_cnn
keep_freed_memory()
torch.manual_seed(0)
m = create_cnn("airbench", 10).to(memory_format=torch.channels_last)
opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
x = torch.randn(1024, 3, 32, 32).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (1024,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x).logits
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(2): step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
for _ in range(4): step()
dt = (time.perf_counter() - t) / 4
print(sys.argv[1], f"{dt:.3f} s/step {1024/dt:.0f} img/s {(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)/4000:.0f}k faults/step")
