"""What `factorize` covers on real model code: the share of each model's weights it holds as factors.

    python bench/coverage.py --markdown bench/results/coverage.md

Models built from configs (no download; needs timm and transformers): a torch nn.TransformerEncoder
language model (embedding, 2 layers, output layer), GPT-2 and BERT with 2 layers (Hugging Face's
default widths and vocabularies otherwise), timm's resnetv2_50x1_bit, tf_efficientnet_b0 and
mobilenetv3_large_100. Counted over the weights of 2+ dimensions (matrix, conv, attention and
embedding weights), by number of elements, from factorize's report (dwf_kernels.coverage):

- exact classes only: the weights of exact torch.nn.Linear/Conv layers, which earlier releases
  converted (and still convert to DWF layers);
- default: factorize(model, depth); "non-embedding" is the share of the matrix/conv/attention
  weights ("matrix" kind), weight-standardizing convs and embeddings aside;
- include=["*"]: every weight of 2+ dimensions, embeddings and weight-standardizing convs included.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _table import emit  # bench/ is the script's folder, first on sys.path
from torch import nn

import dwf_kernels


class EncoderLM(nn.Module):
    def __init__(self, vocab: int = 10000, width: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _gpt2():
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2))


def _bert():
    import transformers

    return transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=2))


def _timm(name):
    def make():
        import timm

        return timm.create_model(name, pretrained=False)

    return make


MODELS = {
    "nn.TransformerEncoder LM (embedding, 2 layers, head)": EncoderLM,
    "GPT-2 (transformers, 2 layers)": _gpt2,
    "BERT (transformers, 2 layers)": _bert,
    "timm resnetv2_50x1_bit": _timm("resnetv2_50x1_bit"),
    "timm tf_efficientnet_b0": _timm("tf_efficientnet_b0"),
    "timm mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
}


def _share(rows, converted=None, kinds=None) -> float:
    rows = [r for r in rows if kinds is None or r.kind in kinds]
    total = sum(r.numel for r in rows)
    done = sum(r.numel for r in rows if (r.converted if converted is None else converted(r)))
    return 100.0 * done / total if total else float("nan")


def measure(make) -> dict:
    torch.manual_seed(0)
    default, everything = [], []
    dwf_kernels.factorize(make(), 1, init="dense", report=default)
    dwf_kernels.factorize(make(), 1, init="dense", include=["*"], report=everything)
    weights = [r for r in default if len(r.shape) >= 2 and not r.tied_to]  # a tied weight once
    dense = sorted({f"{r.module} ({r.kind})" for r in weights if not r.converted})
    return {
        "exact": _share(weights, converted=lambda r: r.how.startswith("DWF") and r.how != "DWFWeight"),
        "default": _share(weights),
        "matrix": _share(weights, kinds=("matrix",)),
        "everything": _share([r for r in everything if len(r.shape) >= 2 and not r.tied_to]),
        "dense": ", ".join(dense) or "nothing",
    }


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| model | exact classes only | default | default, non-embedding | include=[\"*\"] | left dense by default |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['exact']:.1f}% | {r['default']:.1f}% | {r['matrix']:.1f}% | {r['everything']:.1f}% "
            f"| {r['dense']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    table = markdown({name: measure(make) for name, make in MODELS.items()})
    emit([table.rstrip("\n")], [], args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
