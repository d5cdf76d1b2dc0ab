"""Every registered method under DDP: with BatchNorm on running statistics (eval mode, so no
per-device batch coupling), the gradients two gloo processes average from their halves of a
batch equal one process's gradients on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import free_port
from torch.nn.parallel import DistributedDataParallel

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.methods import BUILTIN_METHODS, build_method

WORLD_SIZE = 2
SMALL = ["model.width=0.125", "data.image_size=16", "train.batch_size=8",
         "method.mocov2.queue_size=64", "method.mocov2.symmetric=true",
         *[f"method.{base}.{dim}=16" for base, dims in {
             "mocov2": ("proj_hidden_dim", "proj_output_dim"),
             "byol": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
             "simsiam": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
             "barlow_twins": ("proj_hidden_dim", "proj_output_dim"),
             "vicreg": ("proj_hidden_dim", "proj_output_dim"),
             "simclr": ("proj_hidden_dim", "proj_output_dim"),
             "mocov3": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
             "dino": ("proj_hidden_dim", "bottleneck_dim", "num_prototypes")}.items()
           for dim in dims]]
# The five bases and the baselines on the same Siamese step (global negatives: SimCLR's
# gathered with gradient, MoCo v3's keys without; DINO's teacher on both views at once).
SIAMESE = (*BUILTIN_METHODS, "simclr", "mocov3", "dino")


def eval_mode_method(name: str):
    torch.manual_seed(0)
    return build_method(load_config(None, [*SMALL, f"method.name={name}"])).eval()


def global_views() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=generator) for _ in range(2)]


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        local = slice(4 * rank, 4 * rank + 4)
        views = [view[local] for view in global_views()]
        results = {}
        for name in SIAMESE:
            method = eval_mode_method(name)
            model = DistributedDataParallel(method)
            output = model(Batch.from_views(*views), torch.Generator().manual_seed(0), 0.0)
            output.loss.backward()  # DDP averages the gradients over the processes
            results[name] = {key: param.grad.clone() for key, param in method.named_parameters()
                             if param.grad is not None}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_every_method_ddp_gradients_equal_the_whole_batch_gradients(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE,
                                join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for name in SIAMESE:
        method = eval_mode_method(name)
        output = method.training_step(Batch.from_views(*global_views()),
                                      torch.Generator().manual_seed(0), 0.0)
        output.loss.backward()
        expected = {key: param.grad for key, param in method.named_parameters()
                    if param.grad is not None}
        assert any(key.startswith("backbone.") for key in expected), name
        # Absolute tolerance on the method's gradient scale: some gradients are zero in
        # exact arithmetic (the last projector bias under Barlow Twins' batch
        # standardisation) and only rounding is left of them.
        scale = max(grad.abs().max().item() for grad in expected.values())
        for results in ranks:
            assert set(results[name]) == set(expected), name
            for key, grad in expected.items():
                torch.testing.assert_close(results[name][key], grad, rtol=1e-4,
                                           atol=1e-6 * scale, msg=f"{name}: {key}")
