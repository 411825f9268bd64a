"""FSDP with adapters: a peftkit-adapted model sharded with FSDP2 (``fully_shard``, gloo on CPU, 2 processes) trains
the adapter exactly as one process does on the concatenated batch — frozen and trainable parameters side by side in
the sharded modules — and the gathered adapter saves and loads with ``peftkit.save`` / ``peftkit.load``.

(FSDP1, ``FullyShardedDataParallel``, needs an accelerator; with it, pass ``use_orig_params=True`` so that a flat
parameter may mix frozen base weights and trainable adapter tensors — see the README.)"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import peftkit
from multiproc import run_child
from peftkit.core.model import read_adapter
from tolerance import assert_near

WORKER = """
import sys, torch, torch.distributed as dist
from torch import nn
import peftkit
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, {here!r})
from test_fsdp import build, data, STEPS

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
model = build()
mesh = init_device_mesh("cpu", (size,))
for block in model.blocks:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
x, y = data()
for _ in range(STEPS):
    xs, ys = x.chunk(size)[rank], y.chunk(size)[rank]
    nn.functional.cross_entropy(model(xs), ys).backward()
    opt.step()
    opt.zero_grad()
full = {{n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
         for n, p in model.named_parameters() if p.requires_grad}}
if rank == 0:
    plain = build()  # an unsharded twin gets the gathered values and saves the adapter the usual way
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if n in full:
                p.copy_(full[n])
    peftkit.save(plain, {out!r})
dist.destroy_process_group()
"""

STEPS = 4


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12, 12), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    peftkit.adapt(model, peftkit.config("lora", target_modules=r"blocks\.\d\.0", r=4, modules_to_save=["head"]))
    with torch.no_grad():  # B ≠ 0 so that A gets gradients from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_fsdp2_two_processes_equal_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER).format(here=str(Path(__file__).parent), out=str(tmp_path / "fsdp")))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
              env=env, clean=[tmp_path / "fsdp"])

    ref = build()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    x, y = data()
    for _ in range(STEPS):
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    _, saved, _ = read_adapter(build(), tmp_path / "fsdp")  # peftkit's names, whichever format the save chose
    want = peftkit.adapter_state_dict(ref)
    assert sorted(saved) == sorted(want)
    # 2 processes sum the batch gradients in another order: rounding of a 16 × 12 reduction, through STEPS updates
    for k in want:
        assert_near(saved[k], want[k], 16 * 12, layers=STEPS, msg=k)
    loaded = build()
    peftkit.load(loaded, tmp_path / "fsdp", name="trained")
    peftkit.set_active(loaded, "trained")
    with torch.no_grad():
        assert_near(loaded(x), ref(x), 16 * 12, layers=STEPS + 3)
