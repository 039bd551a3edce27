"""The models users bring, built from small configs with random weights (never downloaded), and their batches.

Shared by ``tests/test_user_models.py`` and ``bench/user_models.py``. Each :class:`UserModel` knows how the model is
called (positional tensors, or HF keyword arguments with an attention mask), which tensor is the logits, its loss
for KFC's Fisher (language models: cross-entropy over the last dim) and, for HF models, the ``labels=`` the model
turns into its own loss. Train mode is stochastic wherever the architecture allows it (dropout, drop-path, an
``if self.training:`` noise branch, LSTM/GRU inter-layer dropout), so that the train/eval comparisons can fail.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import kfc_compile as kc

N, T, VOCAB, CLASSES = 4, 8, 64, 5


@dataclass
class Batch:
    """One fixed batch: the call's positional / keyword inputs and the targets (an HF model's ``labels=``)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    targets: torch.Tensor | None = None


@dataclass(frozen=True)
class UserModel:
    """A test model: how to build it, feed it, read its logits and score them."""

    name: str
    build: Callable[[], nn.Module]  # deterministic: seeds the RNG itself
    batch: Callable[[], Batch]  # deterministic
    loss: kc.CrossEntropy = kc.CrossEntropy()
    hf: bool = False  # a transformers model: keyword calls, ModelOutput returns, labels= computes its own loss
    recurrent: bool = False  # nn.LSTM / nn.GRU inside (dynamo runs such frames eagerly)

    def call(self, model, batch: Batch, labels: bool = False):
        """``model(...)`` as a user writes it (HF: keyword arguments, with ``labels=`` when asked)."""
        if labels:
            return model(*batch.args, **batch.kwargs, labels=batch.targets)
        return model(*batch.args, **batch.kwargs)

    def inputs(self, batch: Batch, labels: bool = False):
        """The batch as ``kc.curvature`` takes it: the positional tensors, or the keyword dict (``labels`` too)."""
        if self.hf:
            return {**batch.kwargs, "labels": batch.targets} if labels else dict(batch.kwargs)
        return batch.args

    def logits_loss(self, out, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the logits (class dim last for language models), as a user writes it without labels."""
        return self.loss.batch_loss(logits(out), batch.targets)

    def training_loss(self, model, batch: Batch) -> torch.Tensor:
        """The loss a user back-propagates: an HF model's own ``out.loss`` from ``labels=``, else cross-entropy."""
        if self.hf:
            return self.call(model, batch, labels=True).loss
        return self.logits_loss(self.call(model, batch), batch)


def logits(out) -> torch.Tensor:
    """The logits of a model output (a tensor or an HF ``ModelOutput``)."""
    return out if isinstance(out, torch.Tensor) else out.logits


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()
    return build


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _token_batch(classify: bool) -> Batch:
    g = _generator()
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, -3:] = 0  # a padded example: the mask changes the outputs
    labels = torch.randint(0, CLASSES, (N,), generator=g) if classify else ids
    return Batch(kwargs={"input_ids": ids, "attention_mask": mask}, targets=labels)


def _image_batch(size: int, hf: bool = False) -> Batch:
    g = _generator()
    x = torch.randn(N, 3, size, size, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    if hf:
        return Batch(kwargs={"pixel_values": x}, targets=y)
    return Batch(args=(x,), targets=y)


def _sequence_batch() -> Batch:
    g = _generator()
    return Batch(args=(torch.randn(N, T, 6, generator=g),), targets=torch.randint(0, CLASSES, (N,), generator=g))


def gpt2() -> nn.Module:
    """HF GPT-2 LM head model: 2 layers, width 32, 2 heads, vocab 64 (dropout 0.1: its defaults)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def bert() -> nn.Module:
    """HF BERT sequence classifier: 2 layers, width 32, 2 heads, 5 labels (dropout 0.1: its defaults)."""
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=CLASSES))


def llama() -> nn.Module:
    """HF Llama causal LM: 2 layers, width 32, 2 heads (no dropout in Llama: train mode is deterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16))


def hf_vit() -> nn.Module:
    """HF ViT image classifier: 32×32 images, patch 8, 2 layers, width 32, dropout 0.1 (the default is 0)."""
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))


def timm_vit() -> nn.Module:
    """The timm ``vit_tiny_patch16_224``, 2 blocks, 32×32 images, patch 8, drop-path 0.2 (reads self.training)."""
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=CLASSES, drop_path_rate=0.2)


def convnext() -> nn.Module:
    """The timm ``convnext_atto`` (32×32 inputs reach 1×1 at stride 32), drop-path 0.1."""
    import timm
    return timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES, drop_path_rate=0.1)


def mobilevit() -> nn.Module:
    """The timm ``mobilevitv2_050`` at 64×64: 2×2 maps at stride 32, whole 2×2 patches.

    At 32×32 the last stages run on 1×1 maps, train-mode BatchNorm over 4 values, and the loss bounces.
    """
    import timm
    return timm.create_model("mobilevitv2_050", pretrained=False, num_classes=CLASSES)


class TrainingBranch(nn.Module):
    """A local model whose forward branches on ``self.training`` (noise injection in train mode only)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        h = self.fc(torch.relu(self.conv(x)).flatten(1))
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
        return self.head(torch.tanh(h))


class Recurrent(nn.Module):
    """A 2-layer LSTM or GRU (inter-layer dropout 0.1) over (N, T, 6) with a Linear head on the last step."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(6, 16, num_layers=2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


MODELS: dict[str, UserModel] = {m.name: m for m in [
    UserModel("gpt2", _seeded(gpt2), lambda: _token_batch(classify=False), kc.CrossEntropy(class_dim=-1), hf=True),
    UserModel("bert", _seeded(bert), lambda: _token_batch(classify=True), hf=True),
    UserModel("llama", _seeded(llama), lambda: _token_batch(classify=False), kc.CrossEntropy(class_dim=-1),
              hf=True),
    UserModel("hf_vit", _seeded(hf_vit), lambda: _image_batch(32, hf=True), hf=True),
    UserModel("timm_vit", _seeded(timm_vit), lambda: _image_batch(32)),
    UserModel("convnext_atto", _seeded(convnext), lambda: _image_batch(32)),
    UserModel("mobilevitv2_050", _seeded(mobilevit), lambda: _image_batch(64)),
    UserModel("training_branch", _seeded(TrainingBranch), lambda: _image_batch(16)),
    UserModel("lstm", _seeded(lambda: Recurrent(nn.LSTM)), _sequence_batch, recurrent=True),
    UserModel("gru", _seeded(lambda: Recurrent(nn.GRU)), _sequence_batch, recurrent=True),
]}


def kfc_options(um: UserModel, **overrides) -> dict:
    """``kc.KFC`` arguments under which 5 steps on the fixed batch decrease the loss robustly, for every model.

    The small ν threshold keeps each step inside a trust region (the batch of 4 is memorised within a few steps
    otherwise, and the loss then bounces).
    """
    # clip_curvature="exact", clip_on="update" where factored: what these options resolved to when they were tuned,
    # before the factored ν of the applied step became the default (its ν is on another scale)
    kw = dict(lr=0.1, damping=0.1, clip=0.01, clip_curvature="exact", loss=um.loss)
    if um.hf:
        # keyword-called models: the statistics subset pass and the exact Fisher products replay positional inputs
        # only, until keyword replays land; whole-batch statistics and the factored ν meanwhile
        kw.update(stats_fraction=1.0, clip_curvature="factored", clip_on="update")
    if um.name == "lstm":
        kw.update(clip_curvature="factored", clip_on="update")  # the exact ν needs forward AD: mkldnn_rnn_layer
        # lacks it on CPU
    kw.update(overrides)
    return kw
