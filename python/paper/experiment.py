"""One DWF training run, end to end: data, factorized model, Algorithm 2, collapse, report."""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

import dwf_kernels

from . import distributed
from .data import DATASETS, load_data
from .distributed import RankFailure
from .models import MODELS, build_model, count_parameters
from .training import LoopConfig, evaluate, fit, seed_everything, sparsity_metrics, write_json

EXACT_THRESHOLD = dwf_kernels.DEFAULT_THRESHOLD  # float32 eps: exactly-zero weights
PRACTICAL_THRESHOLD = 1e-4
COMPRESSED_FILE = "model.dwfz"  # the model collapsed at PRACTICAL_THRESHOLD (dwf_kernels.save_compressed)


@dataclass
class DWFConfig:
    model: str = "lenet300"
    dataset: str = "mnist5k"
    depth: int = 4
    lam: float = 3e-3
    lr: float = 0.15
    momentum: float = 0.9
    epochs: int = 100
    batch_size: int = 128
    penalty_mode: str = "penalty"  # "penalty": dwf_kernels.penalty; "weight_decay": 2*lam/D on the factors
    backend: str | None = None
    seed: int = 0
    device: str = "auto"
    data_root: str = "data"
    download: bool = False
    num_workers: int = 0
    output_dir: str | None = None
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    dist_timeout: float = 30.0  # seconds a rank of a data-parallel run waits for the others

    def check(self) -> None:
        """Refuses a configuration that cannot train, naming the field (before any data is loaded)."""
        _check_choice("model", self.model, MODELS)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_int("depth", self.depth, 1, 16)
        _check_number("lam", self.lam, minimum=0.0)
        _check_number("lr", self.lr, minimum=0.0, inclusive=False)
        _check_number("momentum", self.momentum, minimum=0.0)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("num_workers", self.num_workers, 0)
        if self.stop_after is not None:
            _check_int("stop_after", self.stop_after, 1)
        _check_choice("penalty_mode", self.penalty_mode, ("penalty", "weight_decay"))
        _check_choice("backend", self.backend, (None, *dwf_kernels.BACKENDS))
        _check_number("dist_timeout", self.dist_timeout, minimum=0.0, inclusive=False)
        world = distributed.launched_world()
        if self.batch_size < world:
            raise ConfigError("batch_size", f"must be at least the number of ranks ({world}): it is the global batch")
        resolve_device(self.device)

    def identity(self) -> dict:
        """What a checkpoint must match for --resume (everything that changes the trajectory)."""
        keep = ("model", "dataset", "depth", "lam", "lr", "momentum", "epochs", "batch_size", "penalty_mode", "seed")
        return {k: getattr(self, k) for k in keep}


class ConfigError(ValueError):
    """A configuration field that cannot work; `field` names it, the message says what is expected."""

    def __init__(self, field: str, expectation: str) -> None:
        super().__init__(f"{field} {expectation}")
        self.field = field
        self.expectation = expectation


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer; got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ConfigError(name, f"must be {bounds}; got {value}")


def _check_number(name: str, value, minimum: float, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number; got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise ConfigError(name, f"must be {'>=' if inclusive else '>'} {minimum:g}; got {value:g}")


def resolve_device(name: str) -> torch.device:
    """The training device: "auto" (the GPU if any), or a torch device string that is usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"{expected}; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{name!r} needs CUDA, which is not available here; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError("device", f"{expected}; got {name!r}")
    return device


def _seeded_data(cfg, device: torch.device | None = None) -> tuple[torch.device, object]:
    """Seeds every RNG with cfg.seed and loads cfg.dataset for `device` (default: cfg.device; auto:
    the GPU if any)."""
    device = resolve_device(cfg.device) if device is None else device
    seed_everything(cfg.seed)
    data = load_data(
        cfg.dataset,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        data_root=cfg.data_root,
        download=cfg.download,
        num_workers=cfg.num_workers,
    )
    return device, data


def run_dwf(cfg: DWFConfig) -> dict:
    """Trains a factorized model the paper's way and returns the results (also written to
    output_dir/results.json when output_dir is set)."""
    return train_dwf(cfg)[0]


def train_dwf(cfg: DWFConfig) -> tuple[dict, torch.nn.Module, object]:
    """run_dwf, also returning the model collapsed at the exact-zero threshold and the data.

    Launched on several ranks (torchrun; paper.distributed), trains data-parallel; rank 0 alone
    writes the files. Raises TrainingDiverged when the loss or the parameters become NaN or Inf, and
    RankFailure when another rank stops."""
    cfg.check()
    ranks, device = distributed.start(resolve_device(cfg.device), cfg.dist_timeout)
    try:
        return _train_dwf(cfg, ranks, device)
    except RuntimeError as exc:
        if ranks.world == 1 or not distributed.is_collective_failure(exc):
            raise
        where = f"the last checkpoint is in {cfg.output_dir}: " if cfg.output_dir else ""
        raise RankFailure(
            f"rank {ranks.rank} of {ranks.world}: another rank stopped or did not answer within "
            f"{cfg.dist_timeout:g} s ({str(exc).strip().splitlines()[0]}); {where}start the run again with --resume"
        ) from exc
    finally:
        distributed.stop(ranks)


def _train_dwf(cfg: DWFConfig, ranks: distributed.Ranks, device: torch.device):
    if cfg.output_dir:
        os.makedirs(cfg.output_dir, exist_ok=True)
    device, data = _seeded_data(cfg, device)
    dense = build_model(cfg.model, data.in_shape, data.num_classes)
    dense_parameters = count_parameters(dense)
    model = dwf_kernels.factorize(dense, cfg.depth).to(device)

    factors = [p for n, p in model.named_parameters() if n.endswith("factors")]
    others = [p for n, p in model.named_parameters() if not n.endswith("factors")]
    if cfg.penalty_mode == "weight_decay":
        groups = [{"params": factors, "weight_decay": 2 * cfg.lam / cfg.depth}, {"params": others, "weight_decay": 0.0}]
        extra_loss = None
    else:
        groups = [{"params": factors + others, "weight_decay": 0.0}]

        def extra_loss(m):
            return dwf_kernels.penalty(m, cfg.lam)

    loop = LoopConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        progress=cfg.progress,
        stop_after=cfg.stop_after,
        output_dir=cfg.output_dir,
        resume=cfg.resume,
        identity=cfg.identity(),
    )
    started = time.perf_counter()
    with dwf_kernels.use_backend(cfg.backend):
        outcome = fit(
            model,
            data,
            groups,
            loop,
            extra_loss=extra_loss,
            epoch_metrics=sparsity_metrics({"eps": EXACT_THRESHOLD, "1e-4": PRACTICAL_THRESHOLD}),
            ranks=ranks,
        )
        results = {
            "config": asdict(cfg),
            "device": str(device),
            "ranks": ranks.world,
            "backend": cfg.backend or dwf_kernels.available_backends(device)[0],
            "dense_parameters": dense_parameters,
            "completed": outcome["completed"],
            "history": outcome["history"],
            "train_seconds": outcome["train_seconds"],
            "wall_seconds": time.perf_counter() - started,
            "test_acc_dwf": evaluate(model, data, ranks),
        }
        for name, thr in (("exact", EXACT_THRESHOLD), ("practical", PRACTICAL_THRESHOLD)):
            collapsed = dwf_kernels.collapse(model, thr)
            report = dwf_kernels.sparsity_report(collapsed, thr)
            results[name] = {
                "threshold": thr,
                "test_acc": evaluate(collapsed, data, ranks),
                "compression": report.total.compression,
                "sparsity": report.total.sparsity,
                "report": report.as_dict(),
                "table": str(report),
                **file_sizes(collapsed),
            }
            if name == "exact":
                exact_model = collapsed
            elif cfg.output_dir and ranks.main:  # the practical model, as a file of its nonzeros
                dwf_kernels.save_compressed(collapsed, os.path.join(cfg.output_dir, COMPRESSED_FILE))
    if cfg.output_dir and ranks.main:
        write_json(os.path.join(cfg.output_dir, "results.json"), results)
    return results, exact_model, data


def file_sizes(model: torch.nn.Module) -> dict:
    """Bytes of the model's compressed file and of torch.save of its (dense) state_dict."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return {"compressed_bytes": len(dwf_kernels.compressed.compressed_bytes(model)), "torch_save_bytes": buffer.tell()}


def summary(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"{cfg['model']} on {cfg['dataset']}, D={cfg['depth']}, lambda={cfg['lam']:g}, {cfg['epochs']} epochs "
        f"({results['device']}{_on_ranks(results)}, backend {results['backend']}, "
        f"{results['train_seconds']:.1f} s training)"
        + ("" if results["completed"] else "  [stopped early; continue with --resume]"),
        f"test accuracy (factorized model): {results['test_acc_dwf']:.2f}%",
    ]
    for name in ("exact", "practical"):
        r = results[name]
        lines.append(
            f"collapsed at |w| < {r['threshold']:g}: test accuracy {r['test_acc']:.2f}%, "
            f"compression ratio {r['compression']:.1f}x (sparsity {100 * r['sparsity']:.2f}%)"
        )
        if "compressed_bytes" in r:
            lines.append(
                f"  file of its nonzeros: {r['compressed_bytes']:,} bytes; torch.save of its state_dict: "
                f"{r['torch_save_bytes']:,} bytes ({r['torch_save_bytes'] / r['compressed_bytes']:.0f}x larger)"
            )
    if results["config"].get("output_dir"):
        threshold = results["practical"]["threshold"]
        lines.append(f"compressed model (|w| < {threshold:g}): {COMPRESSED_FILE} in the output folder")
    lines += ["", f"per-layer sparsity at |w| < {results['practical']['threshold']:g}:", results["practical"]["table"]]
    return "\n".join(lines)


def _on_ranks(results: dict) -> str:
    ranks = results.get("ranks", 1)
    return f" x {ranks} ranks" if ranks > 1 else ""


@dataclass
class TrainingConfig:
    """How the baselines train their dense weights (SGD with momentum, cosine annealing, weight decay)."""

    model: str = "lenet300"
    dataset: str = "mnist5k"
    lr: float = 0.05
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 100
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    data_root: str = "data"
    download: bool = False
    num_workers: int = 0
    progress: bool = False

    def check(self) -> None:
        """Refuses a configuration that cannot train, naming the field (before any data is loaded)."""
        _check_choice("model", self.model, MODELS)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_number("lr", self.lr, minimum=0.0, inclusive=False)
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        _check_number("momentum", self.momentum, minimum=0.0)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("num_workers", self.num_workers, 0)
        resolve_device(self.device)


@dataclass
class BaselineConfig(TrainingConfig):
    """A pruning-at-initialization baseline (random, snip, synflow) trained with its mask."""

    method: str = "random"
    compression: float = 10.0
    snip_batch: int = 512

    def check(self) -> None:
        _check_choice("method", self.method, PRUNING_METHODS)
        _check_number("compression", self.compression, minimum=1.0)
        _check_int("snip_batch", self.snip_batch, 1)
        super().check()


PRUNING_METHODS = ("random", "snip", "synflow")


def run_pruned_at_init(cfg: BaselineConfig) -> dict:
    """Prunes a freshly initialized dense model to exactly cfg.compression, trains it with the
    mask held fixed, and returns accuracy and compression."""
    from . import baselines

    cfg.check()
    device, data = _seeded_data(cfg)
    model = build_model(cfg.model, data.in_shape, data.num_classes).to(device)
    if cfg.method == "random":
        masks = baselines.random_masks(model, cfg.compression, torch.Generator().manual_seed(cfg.seed))
    elif cfg.method == "snip":
        masks = baselines.snip_masks(model, cfg.compression, *data.train_tensors(cfg.snip_batch))
    elif cfg.method == "synflow":
        masks = baselines.synflow_masks(model, cfg.compression, data.in_shape)
    else:
        raise ValueError(f"method must be 'random', 'snip' or 'synflow'; got {cfg.method!r}")
    loop = LoopConfig(epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, progress=cfg.progress)
    groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    outcome = fit(model, data, groups, loop, after_step=lambda m: baselines.apply_masks(m, masks))
    report = dwf_kernels.sparsity_report(model, EXACT_THRESHOLD)
    return {
        "method": cfg.method,
        "target_compression": cfg.compression,
        "compression": report.total.compression,
        "test_acc": evaluate(model, data),
        "history": outcome["history"],
        "practical": measure_pruned(model, data, PRACTICAL_THRESHOLD),
    }


def measure_pruned(model: torch.nn.Module, data, threshold: float) -> dict:
    """Compression and test accuracy of `model` with its prunable weights below `threshold` set to
    zero (a mask can keep weights that small); `model` is left untouched."""
    import copy

    from . import baselines

    model = copy.deepcopy(model)
    with torch.no_grad():
        for w in baselines.prunable_weights(model).values():
            w.masked_fill_(w.abs() < threshold, 0.0)
    report = dwf_kernels.sparsity_report(model, threshold)
    return {"compression": report.total.compression, "test_acc": evaluate(model, data)}


def magnitude_pruned(model: torch.nn.Module, compression: float, data) -> dict:
    """Global magnitude pruning of a trained dense model to exactly `compression`, no fine-tuning."""
    import copy

    from . import baselines

    pruned = copy.deepcopy(model)
    baselines.apply_masks(pruned, baselines.magnitude_masks(pruned, compression))
    report = dwf_kernels.sparsity_report(pruned, EXACT_THRESHOLD)
    return {
        "method": "magnitude",
        "target_compression": compression,
        "compression": report.total.compression,
        "test_acc": evaluate(pruned, data),
    }
