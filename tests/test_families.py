"""Every supported family: the layer-major recorder reproduces a plain forward pass exactly."""
import numpy as np
import pytest

from ffnscope.cache.schema import encode_grams
from ffnscope.engine.model.load import load_model
from tests.helpers import record_tiny
from tests.reference import combine, reference_stats, top_contexts
from tests.tiny_models import CONFIGS


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_recording_matches_plain_forward(model_type, model_dirs, text_file, tmp_path):
    state = record_tiny(tmp_path / "c.h5", model_dirs[model_type], [text_file], tau=0.0, ngram_max_freq=1.0)
    meta = state.meta
    assert meta["model"]["model_type"] == model_type
    taus, primary = meta["recording"]["taus"], meta["recording"]["primary_index"]
    tokens = state.data.tokens
    model = load_model(str(model_dirs[model_type])).model
    per_batch = 2  # the recorder's batch: batch_tokens 64 / seq_len 32
    parts = [reference_stats(model, tokens[i:i + per_batch], taus, primary) for i in range(0, len(tokens), per_batch)]
    for layer, got in state.layers.items():
        ref = combine([p[layer] for p in parts])
        np.testing.assert_array_equal(got.fire_count, ref["fire_count"])
        np.testing.assert_array_equal(got.pos_fire, ref["pos_fire"])
        np.testing.assert_allclose(got.g_sum, ref["g_sum"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.g_max, ref["g_max"])
        for name, want in top_contexts(ref, tokens.shape[1], meta["recording"]["topk"]).items():
            np.testing.assert_array_equal(getattr(got, name), want, err_msg=f"{layer}.{name}")
        if layer in meta["recording"]["ngram_layers"]:
            dense = np.zeros_like(ref["token_fires"])
            dense_g = np.zeros_like(ref["token_g"])
            uni = got.ngrams[1]
            np.add.at(dense, (uni.gram, uni.neuron), uni.count)
            np.add.at(dense_g, (uni.gram, uni.neuron), uni.g_sum)
            counted = got.ngram_counted  # neurons proven to fire too often for a detector keep no counts
            np.testing.assert_array_equal(dense[:, counted], ref["token_fires"][:, counted])
            np.testing.assert_allclose(dense_g[:, counted], ref["token_g"][:, counted], rtol=1e-9, atol=1e-9)
    assert meta["recording"]["ngram_layers"] == [0, 1]
    assert set(state.layers[2].ngrams) == set()


def test_ngram_counts_match_a_dictionary_count(model_dirs, text_file, tmp_path):
    """Bigram and trigram (gram, neuron) counts equal a direct count; the start token is never in a gram."""
    state = record_tiny(tmp_path / "c.h5", model_dirs["llama"], [text_file], tau=0.0, ngram_max_freq=1.0)
    meta = state.meta
    tokens = state.data.tokens
    model = load_model(str(model_dirs["llama"])).model
    ref = reference_stats(model, tokens, meta["recording"]["taus"], meta["recording"]["primary_index"])
    vocab = meta["model"]["vocab_size"]
    seq_len = tokens.shape[1]
    for n in (2, 3):
        windows = np.lib.stride_tricks.sliding_window_view(tokens, n, axis=1)  # (seqs, seq_len-n+1, n)
        keys = encode_grams(windows[:, 1:], vocab)  # drop windows that hold the start token
        end_pos = np.arange(n, seq_len)               # position of each kept window's last token
        got = state.layers[0].ngrams[n]
        assert len(got) > 0
        # a neuron's gram counts sum to its fires at positions >= n
        fires_by_pos = ref[0]["pos_fire"]
        totals = np.bincount(got.neuron, weights=got.count, minlength=fires_by_pos.shape[1])
        np.testing.assert_array_equal(totals, fires_by_pos[end_pos].sum(0))
        # and the data's gram occurrence counts match too
        uniq, counts = np.unique(keys, return_counts=True)
        np.testing.assert_array_equal(state.data.grams[n].gram, uniq)
        np.testing.assert_array_equal(state.data.grams[n].count, counts)
    assert state.data.unigram[meta["tokenizer"]["start_id"]] == 0


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_adapter_reads_every_family(model_type):
    """The tensors the analyses read: W_out rows, the final norm's scale and the unembedding."""
    from ffnscope.engine.model.sites import Adapter
    from tests.tiny_models import build

    model = build(model_type)
    adapter = Adapter(model)
    config = model.config
    unembedding = adapter.unembedding()
    assert unembedding is model.get_output_embeddings().weight
    assert unembedding.shape[0] == config.vocab_size
    assert adapter.w_out(0).shape == (adapter.d_ffn, unembedding.shape[1])
