"""Compressed files of sparse weights: a collapsed model's state_dict at the size of its nonzeros.

    dwf_kernels.save_compressed(collapse(model), "model.dwfz")
    state = dwf_kernels.load_compressed("model.dwfz")          # name -> dense tensor, bitwise
    dwf_kernels.load_compressed_into(plain_model, "model.dwfz")  # checked, then copied in

The container is safetensors: no pickle (loading runs no code), a JSON header any safetensors
reader can list, and tensors any reader can load. Each tensor is stored in the smaller of two
exact encodings:

- dense: the tensor itself, under its own name;
- sparse: its nonzero values in storage order, and their positions in the flattened tensor as an
  Elias-Fano code: k positions among n take k * (2 + log2(n / k)) bits, within about 2 bits per
  nonzero of the information-theoretic minimum log2 C(n, k). Negative zeros, if any, get a second
  such code, so the round trip is bitwise in every dtype (NaN payloads too). Weights pruned by
  multiplying with a mask hold many -0.0, at 2-3 bits each; `w + 0.0` turns them into +0.0.
  The values of all sparse tensors of one dtype are one tensor (`:values:<dtype>`), their codes
  one byte tensor (`:positions`), and the metadata's `sparse` entry says where each tensor's part
  lies: {name: {"shape", "nnz", "values": first index, "positions": [first byte, bytes],
  "negative_zeros": [count, first byte, bytes] (only if any)}}. Few header entries keep a small
  model's file near the minimum.

Tensors that share storage (tied weights) are stored once. The header's metadata
holds the layout of the sparse tensors, the aliases, and a CRC-32 over every tensor's name, dtype,
shape and bytes: a truncated or corrupted file is refused with an error, never loaded wrong.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

try:  # a dependency of the package; only compressed files need it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

FORMAT = "dwf_kernels.compressed/1"
_POSITIONS = ":positions"  # names of the packed tensors start with ":", which no state_dict key may
_VALUES = ":values:"
# Bytes a sparse tensor adds to the header beyond a dense one (its layout in the metadata); the
# choice of encoding counts them.
_SPARSE_HEADER_BYTES = 60
# Integer views of each dtype's bits, for the bit-pattern nonzero test and the checksum.
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CompressedFileError(ValueError):
    """A compressed file that cannot be trusted (truncated, corrupted, not this format) or does not
    fit the model it is loaded into."""


def compressed_bytes(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> bytes:
    """The contents `save_compressed` writes, as bytes."""
    safetensors = _safetensors()
    state = _state_dict_of(model_or_state_dict)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    values: dict[torch.dtype, list[torch.Tensor]] = {}
    codes: list[np.ndarray] = []
    code_bytes = 0

    def add_code(code: np.ndarray) -> list[int]:
        nonlocal code_bytes
        codes.append(code)
        code_bytes += code.size
        return [code_bytes - code.size, code.size]

    for name, tensor in state.items():
        _check_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] must be a tensor; got {type(tensor).__name__}")
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise ValueError(f"state_dict[{name!r}] must be a dense strided tensor; got layout {tensor.layout}")
        tensor = tensor.detach().cpu()
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        flat = tensor.contiguous().reshape(-1)
        nonzero, negative_zero = _nonzero_and_negative_zero(flat)
        n, k, z = flat.numel(), nonzero.numel(), negative_zero.numel()
        positions = _elias_fano_encode(nonzero.numpy(), n)
        negative_zeros = _elias_fano_encode(negative_zero.numpy(), n)
        sparse_bytes = k * flat.element_size() + positions.size + negative_zeros.size + _SPARSE_HEADER_BYTES
        if k < n and sparse_bytes < n * flat.element_size():
            same_dtype = values.setdefault(tensor.dtype, [])
            entry = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype), "nnz": k}
            entry["values"] = sum(v.numel() for v in same_dtype)
            same_dtype.append(flat[nonzero])
            entry["positions"] = add_code(positions)
            if z:
                entry["negative_zeros"] = [z, *add_code(negative_zeros)]
            layout[name] = entry
        else:
            tensors[name] = tensor.contiguous().clone()
    for dtype, parts in values.items():
        tensors[_VALUES + _dtype_name(dtype)] = torch.cat(parts)
    if codes:
        tensors[_POSITIONS] = torch.from_numpy(np.concatenate(codes))
    metadata = {
        "format": FORMAT,
        "sparse": json.dumps(layout, separators=(",", ":")),
        "aliases": json.dumps(aliases, separators=(",", ":")),
    }
    metadata["crc32"] = f"{_checksum(tensors, metadata):08x}"
    return safetensors.torch.save(tensors, metadata=metadata)


def save_compressed(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Write a model's (or a state_dict's) tensors to `path`, each in its smaller exact encoding.

    A model holding DWF layers is refused: collapse it first (`dwf_kernels.collapse(model,
    threshold)`), which turns its factors into the sparse weights this file is for.
    Returns the file's size in bytes. The file is written to a temporary name and renamed, so
    `path` never holds a partial file.
    """
    blob = compressed_bytes(model_or_state_dict)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(blob)


def load_compressed(path: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """The state_dict saved in `path`, every tensor dense and bitwise as saved (CPU tensors).

    Raises CompressedFileError for a file that is not one of these, truncated or corrupted.
    """
    safetensors = _safetensors()
    SafetensorError, load = safetensors.SafetensorError, safetensors.torch.load
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    try:
        tensors = load(blob)
        metadata = _metadata(blob)
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise CompressedFileError(
            f"{path} is not a readable compressed file (truncated or corrupted?): {error}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CompressedFileError(f"{path} is not a dwf_kernels compressed file (format {metadata.get('format')!r})")
    expected = metadata.pop("crc32", None)
    if expected != f"{_checksum(tensors, metadata):08x}":
        raise CompressedFileError(f"{path} is corrupted: its checksum does not match its contents")
    try:
        layout = json.loads(metadata["sparse"])
        aliases = json.loads(metadata["aliases"])
        state = {name: tensor for name, tensor in tensors.items() if not name.startswith(":")}
        code = tensors[_POSITIONS].numpy() if layout else None
        for name, entry in layout.items():
            n = math.prod(entry["shape"])
            values = tensors[_VALUES + entry["dtype"]]
            first, k = entry["values"], entry["nnz"]
            dense = torch.zeros(n, dtype=values.dtype)
            start, size = entry["positions"]
            dense[torch.from_numpy(_elias_fano_decode(code[start : start + size], k, n))] = values[first : first + k]
            if "negative_zeros" in entry:
                z, start, size = entry["negative_zeros"]
                dense[torch.from_numpy(_elias_fano_decode(code[start : start + size], z, n))] = -0.0
            state[name] = dense.reshape(entry["shape"])
        for name, target in aliases.items():
            state[name] = state[target]
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
        raise CompressedFileError(f"{path} has an inconsistent layout: {error!r}") from None
    return OrderedDict(sorted(state.items()))


def load_compressed_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load `path` into `model` after checking that every name, shape and dtype matches exactly
    (load_state_dict alone would cast a float16 file into a float32 model silently). Returns model."""
    state = load_compressed(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CompressedFileError(
            f"{path} does not fit this model: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}"
        )
    for name, tensor in state.items():
        mine = own[name]
        if mine.shape != tensor.shape or mine.dtype != tensor.dtype:
            raise CompressedFileError(
                f"{path} does not fit this model: {name} is {tuple(tensor.shape)} {tensor.dtype} in the file, "
                f"{tuple(mine.shape)} {mine.dtype} in the model"
            )
    model.load_state_dict(state, strict=True)
    return model


def minimum_bytes(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """A lower bound for any exact file of these tensors: per tensor, the smaller of its dense bytes
    and its nonzero values' bytes plus log2 C(n, k) bits for their positions (shared storage once)."""
    total_bits = 0.0
    seen = set()
    for tensor in _state_dict_of(model_or_state_dict).values():
        tensor = tensor.detach().cpu()
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        n, size = tensor.numel(), tensor.element_size()
        nonzero, negative_zero = _nonzero_and_negative_zero(tensor.contiguous().reshape(-1))
        k, z = nonzero.numel(), negative_zero.numel()
        total_bits += min(8 * n * size, 8 * k * size + _log2_choose(n, k) + _log2_choose(n - k, z))
    return math.ceil(total_bits / 8)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("compressed files need the safetensors package: pip install safetensors") from None
    if np is None:
        raise ImportError("compressed files need numpy: pip install numpy")
    return safetensors


def _state_dict_of(model_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        from .nn import DWFLayer

        factorized = [name for name, m in model_or_state_dict.named_modules() if isinstance(m, DWFLayer)]
        if factorized:
            raise ValueError(
                f"model holds DWF layers ({', '.join(factorized[:3])}{', ...' if len(factorized) > 3 else ''}); "
                "collapse it first: dwf_kernels.collapse(model, threshold) gives the sparse weights to save"
            )
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(
        f"model_or_state_dict must be an nn.Module or a mapping of tensors; got {type(model_or_state_dict).__name__}"
    )


def _check_name(name: object) -> None:
    if not isinstance(name, str) or name.startswith(":"):
        raise ValueError(f"state_dict keys must be strings that do not start with ':'; got {name!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _log2_choose(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _nonzero_and_negative_zero(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the elements that are not zero (NaN included), and of the negative zeros."""
    if flat.is_floating_point():
        zero = flat == 0
        return torch.nonzero(~zero).reshape(-1), torch.nonzero(zero & torch.signbit(flat)).reshape(-1)
    bits = _bits(flat)
    if flat.is_complex():  # an element is zero when both of its parts' bits are
        return torch.nonzero((bits.reshape(-1, 2) != 0).any(1)).reshape(-1), torch.zeros(0, dtype=torch.int64)
    return torch.nonzero(bits != 0).reshape(-1), torch.zeros(0, dtype=torch.int64)


def _storage_key(tensor: torch.Tensor) -> tuple:
    if tensor.numel() == 0:
        return ("empty", id(tensor))
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same width: nonzero exactly where the bits are."""
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    return flat.view(_BITS_VIEW[flat.element_size()])


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    crc = zlib.crc32(json.dumps(sorted(metadata.items())).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        crc = zlib.crc32(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode(), crc)
        if tensor.numel():
            crc = zlib.crc32(_bits(tensor.reshape(-1)).numpy().tobytes(), crc)
    return crc


def _metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size].decode())
    return dict(header.get("__metadata__") or {})


def _low_bits(n: int, k: int) -> int:
    return max(0, math.floor(math.log2(n / k))) if k else 0


def _elias_fano_encode(positions: np.ndarray, n: int) -> np.ndarray:
    """Sorted distinct positions in [0, n) as bytes: k low parts of l bits, then the high parts in
    unary (bit high_i + i set), l = floor(log2(n / k))."""
    k = positions.size
    if k == 0:
        return np.zeros(0, np.uint8)
    low = _low_bits(n, k)
    positions = positions.astype(np.int64)
    lows = (positions[:, None] >> np.arange(low, dtype=np.int64)) & 1
    upper = np.zeros(k + (n >> low) + 1, dtype=np.uint8)
    upper[(positions >> low) + np.arange(k)] = 1
    return np.packbits(np.concatenate([lows.reshape(-1).astype(np.uint8), upper]), bitorder="little")


def _elias_fano_decode(code: np.ndarray, k: int, n: int) -> np.ndarray:
    if k == 0:
        return np.zeros(0, np.int64)
    if not 0 < k <= n:
        raise ValueError(f"{k} nonzeros in a tensor of {n} elements")
    low = _low_bits(n, k)
    bits = np.unpackbits(code, bitorder="little")
    if bits.size < k * low + k + (n >> low) + 1:
        raise ValueError("position code too short")
    lows = bits[: k * low].reshape(k, low).astype(np.int64) @ (np.int64(1) << np.arange(low, dtype=np.int64))
    ones = np.flatnonzero(bits[k * low : k * low + k + (n >> low) + 1])
    if ones.size != k:
        raise ValueError(f"position code holds {ones.size} positions, expected {k}")
    positions = ((ones - np.arange(k)) << low) | lows
    if positions[-1] >= n or np.any(np.diff(positions) <= 0):
        raise ValueError("position code out of range or unordered")
    return positions
