"""factorize on real model code: torch's Transformer layers, MultiheadAttention, Linear/Conv
subclasses, embeddings, and (when installed) Hugging Face GPT-2/BERT and timm models built from
configs. Every weight is converted (DWF layers for exact Linear/Conv, the DWFWeight parametrization
for the rest), and the model trains, collapses and reports as with the DWF layers alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TORCH_CPU_FMA
from torch import nn

import dwf_kernels
from dwf_kernels import _fusion, collapse, factorize, penalty, sparsity_report
from dwf_kernels.coverage import coverage_summary
from dwf_kernels.nn import DWFLinear, DWFWeight
from dwf_kernels.optim import FusedSGD, LazyFactorGrad

DEPTH = 3
STEPS, LR, MOMENTUM, LAM = 3, 0.05, 0.9, 1e-3


class ScaledLinear(nn.Linear):
    """A Linear subclass with a forward of its own (the way timm and others subclass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, 0.5 * self.weight, self.bias) + 0.1


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass padding in its forward (as timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class EncoderLM(nn.Module):
    """A small language model: embedding, nn.TransformerEncoder, output layer."""

    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class Seq2Seq(nn.Module):
    """nn.Transformer (encoder and decoder) between two embeddings and an output layer."""

    def __init__(self, vocab: int = 30, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.transformer = nn.Transformer(width, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.transformer(x, x, tgt_mask=mask))


class CrossAttention(nn.Module):
    """MultiheadAttention with separate q/k/v weights (kdim, vdim != embed_dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
        self.head = ScaledLinear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x[..., :16], x[..., 16:24], x[..., 24:]
        return self.head(self.attention(q, k, v, need_weights=False)[0])


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = PaddedConv(3, 6, 3)
        self.fc = ScaledLinear(6 * 8 * 8, 7)
        self.out = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(25, 8, mode="mean")
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens))


def _tokens(vocab, shape=(3, 6)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _images(shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# --- Hugging Face and timm models, built from configs (no download) --------------------------------


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=60, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def _timm(name):
    def make():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0)

    return make


def _std_convs():
    timm = pytest.importorskip("timm")
    return [timm.layers.StdConv2d, timm.layers.ScaledStdConv2d]


# (make, input maker) for every model; the inputs are made after the model, so that the model's
# seeded initialization does not depend on them.
MODELS = {
    "transformer-encoder-lm": (EncoderLM, lambda: _tokens(40)),
    "transformer-seq2seq": (Seq2Seq, lambda: _tokens(30)),
    "attention-separate-qkv": (CrossAttention, lambda: _images((3, 5, 36))),
    "subclassed-linear-conv": (Subclassed, _images),
    "embedding-bag": (Bag, lambda: _tokens(25, (4, 5))),
    "gpt2": (_gpt2, lambda: _tokens(60, (2, 8))),
    "bert": (_bert, lambda: _tokens(60, (2, 8))),
    "resnetv2_50x1_bit": (_timm("resnetv2_50x1_bit"), lambda: _images((1, 3, 32, 32))),
    "tf_efficientnet_b0": (_timm("tf_efficientnet_b0"), lambda: _images((2, 3, 32, 32))),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), lambda: _images((2, 3, 32, 32))),
}
# Embeddings are opt-in; include= adds them (and with them the output layers tied to them).
WITH_EMBEDDINGS = {"transformer-encoder-lm", "transformer-seq2seq", "embedding-bag", "gpt2", "bert"}


def _include(case: str, embeddings: bool):
    """include= that converts the defaults plus the embeddings (or, for resnetv2, the StdConv2d)."""
    if case == "resnetv2_50x1_bit" and embeddings:
        return ["*"]  # everything: its weight-standardizing convs too
    return ["*"] if embeddings else None


def _build(case: str, seed: int = 0):
    make, inputs = MODELS[case]
    torch.manual_seed(seed)
    model = make()
    return model, inputs()


def _coverage(report, kinds) -> float:
    rows = [r for r in report if r.kind in kinds and not r.tied_to]
    assert rows, f"no weights of kinds {kinds}"
    return sum(r.numel for r in rows if r.converted) / sum(r.numel for r in rows)


def _loss(model, x):
    out = _logits(model(x))
    return out.float().square().mean() + penalty(model, LAM)


CASES = [pytest.param(case, False, id=case) for case in MODELS] + [
    pytest.param(case, True, id=f"{case}-with-embeddings") for case in sorted(WITH_EMBEDDINGS)
]
CASES.append(pytest.param("resnetv2_50x1_bit", True, id="resnetv2_50x1_bit-with-std-convs"))


@pytest.mark.parametrize("case,embeddings", CASES)
def test_factorize_covers_the_model_keeps_outputs_and_collapses_back(case, embeddings):
    model, x = _build(case)
    model.eval()
    types = [type(m) for m in model.modules()]
    before = _logits(model(x))
    report = []
    factorize(model, DEPTH, init="dense", include=_include(case, embeddings), report=report)
    print(coverage_summary(report))
    assert _coverage(report, ("matrix",)) >= 0.99, "\n".join(str(r) for r in report if not r.converted)
    if embeddings and case != "resnetv2_50x1_bit":
        assert _coverage(report, ("embedding",)) == 1.0
    if case == "resnetv2_50x1_bit":
        assert _coverage(report, ("standardized",)) == (1.0 if embeddings else 0.0)
        assert all("weight-standardizing" in r.note for r in report if r.kind == "standardized")
    after = _logits(model(x))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # exact factors: rounding only
    back = collapse(model)
    assert [type(m) for m in back.modules()] == types  # the model's own classes, so its own code runs
    assert not any(isinstance(p, LazyFactorGrad) for p in back.parameters())
    torch.testing.assert_close(_logits(back(x)), after, rtol=1e-5, atol=1e-6)
    assert sparsity_report(back).total.weights == sparsity_report(model).total.weights


@pytest.mark.parametrize("case,embeddings", CASES)
def test_three_fused_sgd_steps_equal_torch_sgd(case, embeddings):
    model, x = _build(case)
    factorize(model, DEPTH, include=_include(case, embeddings))
    twin = copy.deepcopy(model)
    fused = FusedSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    plain = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM, foreach=False)
    for step in range(STEPS):
        for m, optimizer in ((model, fused), (twin, plain)):
            optimizer.zero_grad()
            _loss(m, x).backward()
            if m is model and step == 0:
                # the parametrized weights' factors get the lazy gradient, as the DWF layers' do (but
                # for factors tied to another use, whose two gradients are summed as torch sums them)
                tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n.endswith(".factors")}
                for n, p in model.named_parameters():
                    if n.endswith(".original") and id(p) not in tied:
                        assert type(p.grad) is LazyFactorGrad and p.grad.status == "lazy", n
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if TORCH_CPU_FMA:
            assert torch.equal(p, q), f"{name} differs"
        else:
            torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", ["transformer-encoder-lm", "gpt2", "subclassed-linear-conv"])
def test_state_dict_round_trip_and_deepcopy(case):
    model, x = _build(case)
    factorize(model, DEPTH, include=["*"] if case in WITH_EMBEDDINGS else None)
    model.eval()
    expected = _logits(model(x))
    fresh, _ = _build(case, seed=5)
    factorize(fresh, DEPTH, include=["*"] if case in WITH_EMBEDDINGS else None)
    fresh.eval()
    assert not torch.equal(_logits(fresh(x)), expected)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(fresh(x)), expected, rtol=0, atol=0)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(_logits(copied(x)), expected, rtol=0, atol=0)
    # the copy's factors have their own FusedSGD link: an optimizer of the copy fuses the copy only
    originals = [p for n, p in copied.named_parameters() if n.endswith(".original")]
    assert originals and all(_fusion.link_of(p) is not None for p in originals)
    optimizer = FusedSGD(copied.parameters(), lr=0.1)
    assert all(_fusion.is_fused(p) for p in originals)
    assert not any(_fusion.is_fused(p) for n, p in model.named_parameters() if n.endswith(".original"))
    del optimizer
    collapse(copied)  # torch's parametrized class is shared by a copy: collapsing one leaves the other intact
    torch.testing.assert_close(_logits(model(x)), expected, rtol=0, atol=0)


def test_gpt2_tied_output_layer_follows_the_embedding():
    model, x = _build("gpt2")
    report = []
    factorize(model, DEPTH, report=report)
    head = next(r for r in report if r.name == "lm_head.weight")
    assert not head.converted and head.kind == "embedding" and "tied to transformer.wte.weight" in head.note
    assert head.tied_to == "transformer.wte.weight"
    assert model.lm_head.weight is model.transformer.wte.weight
    model, x = _build("gpt2")
    factorize(model, DEPTH, include=[nn.Embedding, "*.c_attn", "*.c_proj", "*.c_fc"])
    factors = model.transformer.wte.parametrizations.weight.original
    assert isinstance(model.lm_head, DWFLinear) and model.lm_head.factors is factors  # one set of factors
    n_factor_params = sum(1 for _, p in model.named_parameters() if p is factors)
    assert n_factor_params == 1
    back = collapse(model)
    assert back.lm_head.weight is back.transformer.wte.weight


def test_weight_standardizing_convs_report_their_effective_weight():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    conv = timm.layers.StdConv2d(4, 6, 3)
    model = nn.Sequential(conv)
    report = []
    factorize(model, 2, report=report)
    assert not report[0].converted and report[0].kind == "standardized"
    factorize(model, 2, include=_std_convs(), report=report)
    with torch.no_grad():
        model[0].parametrizations.weight.original[0, :3].zero_()  # three output channels all zero
    raw_zeros = 3 * 4 * 9
    row = sparsity_report(model).layers[0]
    assert row.kind == "StdConv2d*" and row.weights == 6 * 4 * 9
    # standardizing an all-zero channel gives zeros again: only those three count
    assert row.nonzeros == row.weights - raw_zeros
    with torch.no_grad():
        # part of a channel: no zeros once standardized
        model[0].parametrizations.weight.original[0, 3, :, :, 0].zero_()
    assert sparsity_report(model).layers[0].nonzeros == row.nonzeros
    assert "effective (standardized) weight" in str(sparsity_report(model))


def test_include_any_named_parameter_and_exclude():
    model = EncoderLM()
    report = []
    factorize(model, 2, include=["*.in_proj_weight", "embed"], exclude=["encoder.layers.1.*"], report=report)
    converted = {r.name for r in report if r.converted}
    assert converted == {"embed.weight", "encoder.layers.0.self_attn.in_proj_weight"}
    assert type(model.head) is nn.Linear and isinstance(model.embed.parametrizations.weight[0], DWFWeight)
    excluded = next(r for r in report if r.name == "encoder.layers.1.self_attn.in_proj_weight")
    assert excluded.note == "excluded"
    # a 1-d parameter is converted when named exactly (the exact Linear/Conv layers hold only their weight)
    model = Subclassed()
    x = _images()
    expected = model(x)
    report = []
    factorize(model, 2, include=["fc.bias", "out.bias", "*.weight*"], init="dense", report=report)
    note = next(r for r in report if r.name == "out.bias").note
    assert note == "a torch.nn.Linear's bias stays a plain parameter of its DWF layer"
    assert model.fc.parametrizations.bias.original.shape == (2, 7) and isinstance(model.out, DWFLinear)
    assert not dwf_kernels.nn.dwf_parametrization(model.conv, "bias")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'0.weight': an Embedding with sparse=True has sparse gradients"):
        factorize(nn.Sequential(nn.Embedding(4, 3, sparse=True)), 2, include=[nn.Embedding])
    with pytest.raises(ValueError, match=r"name must name a parameter of the Linear"):
        DWFWeight.from_dense(nn.Linear(2, 2), 2, name="scale")


def test_penalty_counts_parametrized_factors_once_and_uses_the_forward():
    model = EncoderLM()
    factorize(model, 2, include=["*"])
    x = _tokens(40)
    model(x)
    holders = [(m.parametrizations[n][0], m.parametrizations[n].original) for m in model.modules()
               if hasattr(m, "parametrizations") for n in m.parametrizations]  # fmt: skip
    assert holders and all(h.last_sumsq is not None for h, _ in holders)
    factors = [p for n, p in model.named_parameters() if n.endswith((".original", ".factors"))]
    expected = 0.3 / 2 * sum(p.detach().double().square().sum() for p in factors)
    torch.testing.assert_close(penalty(model, 0.3).double(), expected, rtol=1e-5, atol=0)


def test_factorize_again_and_with_another_depth():
    model = factorize(EncoderLM(), 2)
    assert factorize(model, 2) is model
    assert sum(1 for m in model.modules() if isinstance(m, DWFWeight)) == 4  # nothing added
    with pytest.raises(ValueError, match=r"already holds DWF layers of depth 2 .*self_attn.in_proj_weight"):
        factorize(model, 3)


@pytest.mark.parametrize("case", ["transformer-encoder-lm", "subclassed-linear-conv"])
def test_torch_compile_trains_like_eager(case):
    model, x = _build(case)
    factorize(model, DEPTH)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)
    _loss(model, x).backward()
    _loss(compiled, x).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_parametrized_module_moves_across_dtypes_keeping_its_link():
    model = factorize(Subclassed(), 2)
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    model.double()
    factors = model.fc.parametrizations.weight.original
    assert factors.dtype == torch.float64 and _fusion.fused_by(factors) == [optimizer]
    model.to(memory_format=torch.channels_last)  # the conv's 5-d factors keep their layout
    assert model.conv.parametrizations.weight.original.is_contiguous()
    assert model(_images().double()).dtype == torch.float64
    converter_for = dwf_kernels.nn.converter_for
    assert converter_for(model.fc) is None and converter_for(model.fc, "weight") is None  # already factors
    assert converter_for(nn.Linear(2, 2), "weight") is DWFLinear and converter_for(nn.Linear(2, 2), "bias") is DWFWeight
    assert converter_for(ScaledLinear(2, 2)) is None and converter_for(ScaledLinear(2, 2), "weight") is DWFWeight


def test_cached_reads_compute_each_product_once_and_train_the_same(monkeypatch):
    """MultiheadAttention reads in_proj_weight three times per training forward; under
    parametrize.cached() the product runs once per weight, with the same result and the lazy gradient."""
    reads = []
    product_of = DWFWeight.product_of
    monkeypatch.setattr(DWFWeight, "product_of", lambda self, f: reads.append(self) or product_of(self, f))
    model, x = _build("transformer-encoder-lm")
    factorize(model, DEPTH)
    twin = copy.deepcopy(model)
    optimizer = FusedSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    reference = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM, foreach=False)
    _loss(twin, x).backward()
    assert len(reads) == 2 * 4  # two layers: in_proj_weight three times, out_proj once
    reads.clear()
    with torch.nn.utils.parametrize.cached():
        loss = _loss(model, x)
    assert len(reads) == 2 * 2
    loss.backward()
    in_proj = model.encoder.layers[0].self_attn.parametrizations.in_proj_weight.original
    assert type(in_proj.grad) is LazyFactorGrad and in_proj.grad.status == "lazy"
    optimizer.step()
    reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
