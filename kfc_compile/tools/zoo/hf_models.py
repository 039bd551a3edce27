"""The HF source of the zoo: a fixed list of transformers architectures built from small configs kept here.

Nothing is downloaded: every model is built from a config in :data:`ARCHITECTURES` with random weights. The
inputs are what a training loop passes, as keyword arguments:

* **causal LMs** (``...ForCausalLM``): ``input_ids`` (B, T) and an ``attention_mask`` whose second half of the
  batch has its last 3 positions padded, ``labels=input_ids``. HF shifts the labels inside; the zoo's objective is
  the same loss, ``kc.CrossEntropy(class_dim=-1)`` on ``logits[:, :-1]`` (B, T−1, V) against ``input_ids[:, 1:]``;
  the Fisher is built on the whole logits, the labels visible to KFC with HF's shift (the last position does not
  count: README "Sequence losses"). Padded positions are labelled (and counted) like the others;
* **encoders** (``...ForSequenceClassification``, 4 labels; BERT also ``ForMaskedLM`` with every position
  labelled): the same ``input_ids`` / ``attention_mask``, class ``labels`` (B,) or token labels (B, T);
* **encoder-decoders** (``...ForConditionalGeneration``): the same encoder inputs and decoder ``labels`` (B, 12)
  (the model builds its decoder inputs from them); ``kc.CrossEntropy(class_dim=-1)`` on the (B, 12, V) logits;
* **vision** (``...ForImageClassification``, 10 labels): ``pixel_values`` (B, 3, 32, 32) and ``labels`` (B,).

Each model's own loss (it gets the labels) is checked against the zoo's objective before training, and is what
the training steps back-propagate (``cases.py``). Vocabulary 256, width 64, 2 layers, sequences of 16 tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.tools.zoo.cases import Case, Inputs

VOCAB = 256
SEQ = 16
DECODER_SEQ = 12
IMAGE = 32
PADDED = 3  # padded positions at the end of the second half of the batch
LM = kc.CrossEntropy(class_dim=-1)
CLASSES = kc.CrossEntropy()

_DEC = dict(max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_ENC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, num_labels=4, pad_token_id=0)
_VIT = dict(image_size=IMAGE, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, num_labels=10)


@dataclass(frozen=True)
class Arch:
    """One HF architecture: zoo name, family, config and model class names (in ``transformers``), config options."""

    name: str
    family: str
    config: str
    model: str
    options: dict = field(default_factory=dict)


ARCHITECTURES = (
    Arch("gpt2", "causal-lm", "GPT2Config", "GPT2LMHeadModel",
         dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    Arch("llama", "causal-lm", "LlamaConfig", "LlamaForCausalLM", _LLAMA),
    Arch("mistral", "causal-lm", "MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=8)),
    Arch("qwen2", "causal-lm", "Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    Arch("gemma", "causal-lm", "GemmaConfig", "GemmaForCausalLM", dict(_LLAMA, head_dim=16, pad_token_id=1)),
    Arch("gpt_neox", "causal-lm", "GPTNeoXConfig", "GPTNeoXForCausalLM",
         dict(_DEC, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              pad_token_id=0)),
    Arch("opt", "causal-lm", "OPTConfig", "OPTForCausalLM",
         dict(_DEC, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
              word_embed_proj_dim=64, pad_token_id=1)),
    Arch("bloom", "causal-lm", "BloomConfig", "BloomForCausalLM",
         dict(hidden_size=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    Arch("falcon", "causal-lm", "FalconConfig", "FalconForCausalLM",
         dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0, eos_token_id=0,
              pad_token_id=1)),
    Arch("phi", "causal-lm", "PhiConfig", "PhiForCausalLM",
         dict(_DEC, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              pad_token_id=1)),
    Arch("bert", "encoder", "BertConfig", "BertForSequenceClassification", _ENC),
    Arch("bert_mlm", "encoder", "BertConfig", "BertForMaskedLM", _ENC),
    Arch("roberta", "encoder", "RobertaConfig", "RobertaForSequenceClassification", dict(_ENC, pad_token_id=1)),
    Arch("distilbert", "encoder", "DistilBertConfig", "DistilBertForSequenceClassification",
         dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64, num_labels=4,
              pad_token_id=0)),
    Arch("albert", "encoder", "AlbertConfig", "AlbertForSequenceClassification", dict(_ENC, embedding_size=32)),
    Arch("electra", "encoder", "ElectraConfig", "ElectraForSequenceClassification", dict(_ENC, embedding_size=32)),
    Arch("deberta_v2", "encoder", "DebertaV2Config", "DebertaV2ForSequenceClassification", _ENC),
    Arch("t5", "encoder-decoder", "T5Config", "T5ForConditionalGeneration",
         dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0)),
    Arch("bart", "encoder-decoder", "BartConfig", "BartForConditionalGeneration",
         dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1,
              bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
    Arch("vit", "vision", "ViTConfig", "ViTForImageClassification", _VIT),
    Arch("deit", "vision", "DeiTConfig", "DeiTForImageClassification", _VIT),
    Arch("swin", "vision", "SwinConfig", "SwinForImageClassification",
         dict(image_size=IMAGE, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
              num_labels=10)),
    Arch("convnext", "vision", "ConvNextConfig", "ConvNextForImageClassification",
         dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)),
    Arch("resnet", "vision", "ResNetConfig", "ResNetForImageClassification",
         dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
)
BY_NAME = {a.name: a for a in ARCHITECTURES}
FAMILIES = ("causal-lm", "encoder", "encoder-decoder", "vision")


def build(name: str, resolution: int | None = None) -> nn.Module:
    """The HF model ``name`` of :data:`ARCHITECTURES` with random weights (``resolution`` is ignored)."""
    import transformers

    arch = BY_NAME[name]
    text = {} if arch.family == "vision" else {"vocab_size": VOCAB}
    config = getattr(transformers, arch.config)(**text, **arch.options)
    return getattr(transformers, arch.model)(config)


def _tokens(res: int | None, batch: int, gen: torch.Generator) -> Inputs:
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[batch // 2:, -PADDED:] = 0
    return (), {"input_ids": ids, "attention_mask": mask}


def _pixels(res: int | None, batch: int, gen: torch.Generator) -> Inputs:
    return (), {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}


def _next_tokens(spec, f: torch.Tensor, inputs: Inputs, gen: torch.Generator):
    """Causal LM: the model's labels are its input ids, the objective's targets the next tokens."""
    ids = inputs[1]["input_ids"]
    return ids[:, 1:], ids


def _labels(spec, f: torch.Tensor, inputs: Inputs, gen: torch.Generator):
    """Random classes for the logits, which the model also gets as ``labels``."""
    d = spec.class_dim % f.dim()
    y = torch.randint(f.shape[d], f.shape[:d] + f.shape[d + 1:], generator=gen)
    return y, y


def _decoder_inputs(res: int | None, batch: int, gen: torch.Generator) -> Inputs:
    args, kwargs = _tokens(res, batch, gen)
    return args, {**kwargs, "labels": torch.randint(3, VOCAB, (batch, DECODER_SEQ), generator=gen)}


def _decoder_labels(spec, f: torch.Tensor, inputs: Inputs, gen: torch.Generator):
    """Encoder-decoder: the decoder labels are part of the inputs (they shape the logits)."""
    y = inputs[1]["labels"]
    return y, y


def _shifted_logits(out) -> torch.Tensor:
    return out.logits[:, :-1]


def _logits(out) -> torch.Tensor:
    return out.logits


def case(name: str) -> Case:
    """The zoo case of the HF architecture ``name`` (see the module doc)."""
    arch = BY_NAME[name]
    common = dict(name=name, family=arch.family, build=functools.partial(build, name), labels="labels", source="hf")
    if arch.family == "causal-lm":
        return Case(**common, inputs=_tokens, loss=LM, output=_logits, objective_output=_shifted_logits,
                    targets=_next_tokens)
    if arch.family == "encoder-decoder":
        return Case(**common, inputs=_decoder_inputs, loss=LM, output=_logits, targets=_decoder_labels)
    if arch.family == "vision":
        return Case(**common, inputs=_pixels, loss=CLASSES, output=_logits, targets=_labels)
    lm = arch.model.endswith("ForMaskedLM")
    return Case(**common, inputs=_tokens, loss=LM if lm else CLASSES, output=_logits, targets=_labels)


def cases(names=None) -> list[Case]:
    """Cases for ``names`` (default: every architecture of :data:`ARCHITECTURES`)."""
    return [case(n) for n in (names or [a.name for a in ARCHITECTURES])]
