"""A factorized model under DistributedDataParallel (2 processes, gloo, CPU): gradients and FusedSGD
training equal a single-process run on the same data."""

from __future__ import annotations

import ddp_worker
import pytest
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


@pytest.mark.parametrize(
    "fused_first,find_unused,general",
    [(True, False, False), (False, False, False), (True, True, False), (True, False, True)],
    ids=[
        "fused-sgd-before-process-group",
        "fused-sgd-after-process-group",
        "find-unused-parameters",
        "parametrized-weights",
    ],
)
def test_ddp_with_fused_sgd_trains_like_single_process_sgd(tmp_path, fused_first, find_unused, general):
    """DDP all-reduces the (lazy) factor gradients like any gradient: the ranks stay equal, and equal
    torch.optim.SGD on the whole batch in one process (general: with DWFWeight parametrizations)."""
    out_file = str(tmp_path / "params.pt")
    mp.spawn(
        ddp_worker.train,
        args=(2, str(tmp_path / "init"), out_file, fused_first, find_unused, general),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(f"{out_file}.{rank}") for rank in range(2)]
    reference = ddp_worker.train_single_process(find_unused, general)
    parametrized = [name for name in ranks[0] if name.endswith(".original")]
    assert len(parametrized) == (3 if general else 0), parametrized  # the conv, in_proj and out_proj weights
    for name, p in reference.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the ranks diverged"
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    initial, _, _ = ddp_worker.make_model_and_data(spare=find_unused, general=general)
    for name, p in initial.named_parameters():
        changed = not torch.equal(ranks[0][name], p.detach())
        assert changed == (not name.startswith("spare.")), f"{name} {'moved' if changed else 'did not move'}"
