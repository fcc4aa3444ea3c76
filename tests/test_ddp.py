"""A factorized model under DistributedDataParallel (2 processes, gloo, CPU): gradients equal a
single-process run on the same data."""

from __future__ import annotations

import ddp_worker
import torch
import torch.multiprocessing as mp


def test_ddp_gradients_equal_single_process(tmp_path):
    out_file = tmp_path / "grads.pt"
    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    distributed = torch.load(out_file)
    model, x, y = ddp_worker.make_model_and_data()
    ddp_worker.loss_of(model, x, y).backward()
    assert set(distributed) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(distributed[name], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
