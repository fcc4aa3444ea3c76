"""dwf_kernels.parallel.DistributedDataParallel (2 processes, gloo, CPU): the DWF layers all-reduce
dL/dw, not the factor gradients, and training equals one process on the whole batch."""

from __future__ import annotations

import parallel_worker as worker
import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    mp.spawn(worker.run, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"results.{rank}.pt") for rank in range(WORLD)]


def assert_steps_equal(got, want, rtol, atol):
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys()
        for name in w:
            torch.testing.assert_close(
                g[name], w[name], rtol=rtol, atol=atol, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}"
            )


TOLERANCE = {"bf16": (2e-2, 2e-3), "fp16_grad_scaler": (2e-2, 2e-3), "fp64": (1e-12, 1e-14)}


# A scenario this machine cannot run is skipped before the module's ranks are spawned: on a machine
# with a GPU the triton backend runs CUDA tensors only (one GPU cannot host two NCCL ranks here).
@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            s,
            marks=pytest.mark.skipif(
                not worker.runnable(s),
                reason=f"backend {worker.SCENARIOS[s].get('backend')!r} serves no CPU tensors here "
                "(triton: only installed and under TRITON_INTERPRET=1)",
            ),
        )
        for s in worker.SCENARIOS
    ],
)
def test_training_equals_one_process_on_the_whole_batch(ranks, scenario):
    """K ranks with per-rank batch B give one process's result with batch K*B, and every rank holds
    bitwise the same parameters after every step: FusedSGD or torch.optim.SGD; no_sync()
    accumulation; a layer only rank 0 applies, penalized or not, with one bucket per layer; a layer
    no rank applies; a layer applied twice; bf16 autocast, and fp16 autocast with GradScaler (to
    their rounding; the scaler skips the same steps); torch.compile of the wrapped model; float64;
    the reference and Triton backends."""
    for a, b in zip(ranks[0][scenario]["steps"], ranks[1][scenario]["steps"], strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), f"{scenario}: the ranks differ in {name}"
    rtol, atol = TOLERANCE.get(scenario, (1e-5, 1e-6))
    steps, scales = worker.reference(scenario, WORLD)
    assert_steps_equal(ranks[0][scenario]["steps"], steps, rtol, atol)
    assert ranks[0][scenario]["scales"] == ranks[1][scenario]["scales"] == scales
    # Every step with FusedSGD applied the DWF layers' gradients fused (consumed, never formed),
    # but the one the scaler skipped.
    statuses = ranks[0][scenario]["statuses"]
    if scenario == "sgd":
        assert statuses == ["dense"] * worker.STEPS
    elif scenario == "fp16_grad_scaler":
        assert statuses == ["lazy"] + ["consumed"] * (worker.STEPS - 1)
    else:
        assert statuses == ["consumed"] * worker.STEPS
    assert (ranks[0][scenario]["graphs"] > 0) == (scenario == "compiled")
    if scenario == "fp16_grad_scaler":
        # The first step overflowed (an inf in either rank's dL/dw reaches both through the
        # all-reduce): skipped on both, the parameters as they were; the next ones applied.
        assert scales[0] < 2.0**20 and scales[1:] == [scales[0]] * (worker.STEPS - 1)
        initial = worker.snapshot(worker.make())
        assert_steps_equal(ranks[0][scenario]["steps"][:1], [initial], 0, 0)
        assert not torch.equal(steps[1]["body.0.factors"], initial["body.0.factors"])


def test_uneven_inputs_under_join(ranks):
    """Rank 1 runs out of batches one step early: under model.join() it shadows the reductions of the
    last step and ends with rank 0's parameters."""
    a, b = ranks[0]["joined"], ranks[1]["joined"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert_steps_equal([a], [worker.joined_reference(WORLD)], 1e-5, 1e-6)


def test_bitwise_repeatable(ranks):
    for a, b in zip(ranks[0]["fused"]["steps"], ranks[0]["fused_again"]["steps"], strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_layer_without_gradient_anywhere_keeps_none(ranks):
    # `extra` is neither used nor penalized in "unused": no rank has a gradient for it.
    assert ranks[0]["unused"]["extra_grad_none"] == [True] * worker.STEPS
    initial = dict(worker.make(with_extra=True).named_parameters())["extra.factors"].detach()
    assert torch.equal(ranks[0]["unused"]["steps"][-1]["extra.factors"], initial)
    # Used by rank 0 only: both ranks get the averaged gradient.
    assert ranks[1]["partial"]["extra_grad_none"] == [False] * worker.STEPS


def test_dwf_weights_move_one_dth_of_the_factor_gradients(ranks):
    net = worker.make()
    factors = [p for name, p in net.named_parameters() if name.endswith("factors")]
    others = [p for name, p in net.named_parameters() if not name.endswith("factors")]
    reduced = ranks[0]["fused"]["dwf_reduced"]
    # dL/dw: N elements per weight, where torch's DDP all-reduces the D x N factor gradient.
    assert reduced["grad_w_elements"] * worker.DEPTH == sum(p.numel() for p in factors)
    assert reduced["header_elements"] == 4 * len(factors) + 1
    # torch's reducer inside the wrapper all-reduces the other parameters only.
    assert ranks[0]["fused"]["reducer_elements"] == sum(p.numel() for p in others)


def test_first_all_reduce_starts_before_the_backward_ends(ranks):
    events = ranks[0]["overlap"]
    # One bucket per layer: the linear's dL/dw (10 x 144) goes out while the backward pass has yet to
    # reach the conv; then the conv's (4 x 1 x 3 x 3) and the header (4 per layer + 1) at the end.
    assert events == ["all_reduce 1440", "first layer's gradient", "all_reduce 36", "all_reduce 9"], events


def test_refused_patterns_fail_alike_on_every_rank(ranks):
    for rank, results in enumerate(ranks):
        refusals = results["refusals"]
        # Rank 0 read its factor gradient inside no_sync(): it has no dL/dw to send. Both ranks refuse.
        assert "on 1 of 2 ranks a DWF factor gradient could not be all-reduced" in refusals["formed"]
        assert ("formed before it was reduced: read" in refusals["formed"]) == (rank == 0)
        assert refusals["then_trains"] == "yes"
        assert "forward through the wrapper" in refusals["second_backward"]
        assert "trainable parameter besides the DWF factors" in refusals["only_factors"]
        assert "already wrapped in a DistributedDataParallel" in refusals["nested"]
        assert refusals["rewrapped_trains"] == "yes"
        assert refusals["ignore_list_left"] == "False"
        assert float(refusals["timeout_s"]) == worker.TIMEOUT_S
