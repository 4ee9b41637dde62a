"""A synthetic recording cache shaped like OPT-66b's, with all four analyses stored, for benchmarking
the TUI on 64 x 36,864 = 2.36M neurons.

    python bench/synthetic_cache.py OUT.h5 [--layers 64] [--d-ffn 36864] [--seq-len 2048] [--vocab 50272]
                                           [--seqs 64] [--samples 0] [--seed 0]

or from Python: `from bench.synthetic_cache import generate; planted = generate(path, layers=4, d_ffn=256)`.
Prints the generation time, file size and peak memory.

What is exact:
- Structure: every group, dataset, dtype, shape, chunk shape, filter and attribute is what
  `cache.store.write_state` and `cache.analysis_store.write_results` write (datasets go through the
  same `cache.store._put` helpers; `pos_fire` is written chunk by chunk with the same dataset options,
  its all-zero chunks as the bytes HDF5 itself produces for one). tests/test_synthetic_cache.py
  rewrites a small cache with the real writers and compares the two.
- Analyses: `dead`, `ngrams` and `positional` hold exactly what `ffnscope analyze` computes from the
  file (the real functions run on the generated arrays; the test recomputes and compares). Their
  params/recording/inputs attributes are those `analyze` writes with default settings, so `analyze`
  reports all four as current.
- Data: `data/unigram` and `data/gram2,3` are counted from `data/tokens` as the recorder counts them;
  n-gram detectors fire on every occurrence of their triggers in the token stream (plus < 5 % of
  noise fires), their fire counts, `pos_fire` columns and n-gram counts follow from those positions.

What is synthetic, and where it is not what a real recording would hold:
- `suppression` rows (one per token detector, as `analyze` makes them) are drawn, not projected
  through model weights: there is no model. Recomputing suppression fails (the model spec
  `synthetic:opt-66b` cannot be loaded); `--only dead ngrams positional` works.
- `pos_fire` is zero except for planted positional neurons and n-gram detectors, so for the other
  alive neurons fire_count[primary] is not the sum of their pos_fire column and their pos_mi is 0.
- The n-gram counts of counted neurons that are not detectors are a random sample of 2-40 of their
  fires, not all of them: their `fires` in analysis/ngrams is below fire_count and their coverage
  numbers are small (at most ~40, where a real model has hundreds).
- fire counts at the non-primary thresholds, g_sum, g_sumsq, g_max and the top-k follow a per-neuron
  exponential model of the ReLU output, consistent with one another (counts fall with the threshold,
  g_max lies in the right threshold bracket, top-k values are at most g_max and only as many are
  above a threshold as fired above it) but not computed from activations. Top-k contexts sit at
  positions >= 1 with g equal to act (ReLU); the start-token slot is sequence 0's position 0, above 0
  only for neurons with fires at position 0. The unigram pairs' g sums put each fire at the neuron's
  mean g.
- suppression's `trigger_g` is drawn positive (ReLU) and `suppresses` is `trigger_logit_z < 0`.
- No activation samples by default (`--samples N` writes N): a default recording keeps 2048, which at
  this size is 9.7 GB of uncompressed float16.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from ffnscope.cache import analysis_store as store  # noqa: E402
from ffnscope.cache import schema  # noqa: E402
from ffnscope.cache.state import G_ORDERS, GramCounts, Sparse, merge_topk  # noqa: E402
from ffnscope.cache.store import _GZIP, _put_strings  # noqa: E402
from ffnscope.cache.store import put_array as _put  # noqa: E402
from ffnscope.engine.analysis.ngrams import NgramParams, ngram_layer, unigram_counts  # noqa: E402
from ffnscope.engine.analysis.positional import KINDS, PositionalParams, call_limit, positional_layer  # noqa: E402
from ffnscope.engine.analysis.run import (POSITIONAL_COLUMNS, SUPPRESSION_KEYS, Analyzer, put_ngram_order,  # noqa: E402
                                 put_positional, put_suppression_rows)
from ffnscope.engine.analysis.suppression import SuppressionParams  # noqa: E402
from ffnscope.engine.data import Packed  # noqa: E402
from ffnscope.engine.meta import EXTRA_TAUS  # noqa: E402
from ffnscope import __version__  # noqa: E402

START_ID = 2                 # OPT: "</s>" is BOS and EOS
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
OPT_TOKENIZER_SIZE = 50265   # OPT's embedding has 50272 rows, its tokenizer 50265 ids
TOPK, NGRAM_MAX_FREQ, CALIB_TOKENS, SHARD_TOKENS, BATCH_TOKENS = 16, 0.05, 32768, 262144, 8192
NOISE_SHARE = 0.03           # detectors' fires off their triggers (a detector needs >= 95 % on them)
# token strings that must reach a terminal only as text; each is planted as a trigger in the first layer
HOSTILE = ("\x1b[31m", "[bold red]", "\r", "\x00", "\x1b[0m", "[/]", "\u202e", "\t", "\n\n", "\x7f",
           "[link=https://example.com]x[/link]", "\ufffd")
COMMON = (",", " the", ".", " and", " of", " to", " a", " in", "\n", " is", " that", " for", "-", " it",
          " with", " was", " on", "'s", " as", " be")
SYLLABLES = ("ka", "to", "ri", "men", "sa", "lo", "ve", "dun", "pi", "qua", "ne", "tra", "ble", "os", "ing",
             "er", "al", "con", "de", "ex", "pro", "ta", "mi", "so", "ul", "ra", "ti", "on", "es", "im", "ly",
             "ment", "ch", "st", "gr", "an", "or", "ut", "ic", "ph")


def _log(message: str) -> None:
    print(message, flush=True)


# --- vocabulary ------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the tokenizer piece of a token is its UTF-8 bytes through this."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _vocabulary(rng, vocab: int, tok_size: int, rank_to_id: np.ndarray, hostile_ids: np.ndarray):
    words = [""] * vocab
    for i, s in enumerate(SPECIALS):
        words[i] = s
    for i in range(len(SPECIALS), tok_size):  # a unique pseudo-word per id: its digits in base len(SYLLABLES)
        digits, rest = [], i
        while rest:
            rest, d = divmod(rest, len(SYLLABLES))
            digits.append(SYLLABLES[d])
        word = "".join(digits)
        words[i] = (" " + word) if i % 3 else word.capitalize() if i % 2 else word
    for rank, text in enumerate(COMMON[:len(rank_to_id)]):
        words[rank_to_id[rank]] = text
    for token, text in zip(hostile_ids.tolist(), HOSTILE):
        words[token] = text
    byte_map = _bytes_to_unicode()
    pieces = [w if i < len(SPECIALS) else "".join(byte_map[b] for b in w.encode("utf-8"))
              for i, w in enumerate(words)]
    return words, pieces


# --- the token stream ------------------------------------------------------------------------------
class Data:
    """Tokens (Zipf-distributed with repeated phrases, as text has), their n-gram counts exactly as the
    recorder counts them, and the n-grams eligible as detector triggers."""

    def __init__(self, rng, vocab: int, seq_len: int, n_seqs: int):
        self.vocab, self.seq_len, self.n_seqs = vocab, seq_len, n_seqs
        self.tok_size = OPT_TOKENIZER_SIZE if vocab >= OPT_TOKENIZER_SIZE else vocab
        regular = self.tok_size - len(SPECIALS)
        self.rank_to_id = len(SPECIALS) + rng.permutation(regular)
        rank_p = (np.arange(regular) + 3.7) ** -1.07
        cdf = np.cumsum(rank_p / rank_p.sum())
        n = n_seqs * seq_len
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), regular - 1)
        tokens = self.rank_to_id[ranks].reshape(n_seqs, seq_len).astype(np.int32)
        tokens[rng.random(tokens.shape) < 1 / 600] = START_ID          # document ends
        # frequent-but-not-too-frequent ranks for the hostile strings, so they make good triggers
        self.hostile_ids = self.rank_to_id[np.minimum(40 + 8 * np.arange(len(HOSTILE)), regular - 1)]
        self._insert_phrases(rng, tokens)
        tokens[:, 0] = START_ID
        self.tokens = tokens
        self.n_documents = int((tokens[:, 1:] == START_ID).sum()) + n_seqs
        self.domains = np.zeros(tokens.shape, np.uint8)
        self._count()

    def _insert_phrases(self, rng, tokens):
        """(rare, frequent, frequent) phrases repeated 6-16 times: trigram and bigram triggers; the first
        ones start with a hostile token."""
        n_phrases = max(len(HOSTILE), tokens.size // 1000)
        first = np.concatenate([self.hostile_ids, self.rank_to_id[rng.integers(30, min(3000, len(self.rank_to_id)),
                                                                              n_phrases - len(HOSTILE))]])
        frequent = self.rank_to_id[rng.integers(0, 12, (n_phrases, 2))]
        self.phrases = np.column_stack([first, frequent])
        repeats = rng.integers(6, 17, n_phrases)
        which = np.repeat(np.arange(n_phrases), repeats)
        seq = rng.integers(0, self.n_seqs, len(which))
        pos = rng.integers(1, self.seq_len - 3, len(which))
        for k in range(3):
            tokens[seq, pos + k] = self.phrases[which, k]

    def _count(self):
        """Per n: the recorder's n-gram keys at every token, and, sorted by key, the valid positions
        (n-grams that avoid the start token), so the positions of any n-gram are one slice."""
        V, T = self.vocab, self.seq_len
        flat = self.tokens.reshape(-1).astype(np.int64)
        within = np.arange(flat.size) % T
        self.keys, self.index = {}, {}
        for n in (1, 2, 3):
            key = flat.copy()
            for shift in range(1, n):
                prev = np.zeros_like(flat)
                prev[shift:] = flat[:-shift]
                key = key + prev * V ** shift
            self.keys[n] = key
            valid = np.flatnonzero(within - n + 1 >= 1)
            order = np.argsort(key[valid], kind="stable")
            grams, start, count = np.unique(key[valid][order], return_index=True, return_counts=True)
            self.index[n] = (grams, start, count.astype(np.int64), valid[order])
        self.unigram = np.bincount(flat[within >= 1], minlength=V).astype(np.int64)
        self.grams = {n: GramCounts(self.index[n][0], self.index[n][2]) for n in (2, 3)}
        self.counts = {1: unigram_counts(self.unigram), **self.grams}

    def positions(self, n: int, keys: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every valid position of each n-gram key -> (owner of that key, global position)."""
        grams, start, count, pos = self.index[n]
        i = np.searchsorted(grams, keys)
        lens = count[i]
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        return np.repeat(owners, lens), pos[np.repeat(start[i], lens) + offsets]

    def eligible(self, n_tokens: int) -> dict[int, np.ndarray]:
        """Trigger n-grams that make a detector of exactly one order: seen 5..cap times, no special token,
        and a neuron firing on all their occurrences fires on no (n-1)- or (n+1)-gram often enough
        for that to count (see engine.analysis.ngrams: covered >= 95 % of occurrences, seen >= 5 times)."""
        V = self.vocab
        cap = max(20, int(0.004 * n_tokens))
        ok_token = np.zeros(V, bool)
        ok_token[len(SPECIALS):self.tok_size] = True
        occ = self.unigram
        g2, _, c2, _ = self.index[2]
        g3, _, c3, _ = self.index[3]
        frequent2, frequent3 = np.where(c2 >= 5, c2, 0), np.where(c3 >= 5, c3, 0)

        def share(parent, frequent, count, size):
            """Per parent: share of its occurrences inside n-grams seen >= 5 times."""
            covered = np.bincount(parent, weights=frequent, minlength=size)
            return covered / np.maximum(np.bincount(parent, weights=count, minlength=size), 1)

        # tokens: mostly not inside bigrams / trigrams seen >= 5 times
        out = {1: np.flatnonzero(ok_token & (occ >= 5) & (occ <= cap) & (share(g2 % V, frequent2, c2, V) < 0.9)
                                 & (share(g3 % V, frequent3, c3, V) < 0.9))}
        # bigrams: at most 0.85 of their last token's occurrences, mostly not inside frequent trigrams
        ids2 = schema.decode_grams(g2, 2, V)
        parent = np.searchsorted(g2, g3 % V ** 2)
        out[2] = g2[ok_token[ids2].all(1) & (c2 >= 5) & (c2 <= cap) & (c2 <= 0.85 * occ[ids2[:, 1]])
                    & (share(parent, frequent3, c3, len(g2)) < 0.9)]
        # trigrams: at most 0.85 of their last bigram's occurrences
        ids3 = schema.decode_grams(g3, 3, V)
        out[3] = g3[ok_token[ids3].all(1) & (c3 >= 5) & (c3 <= cap) & (c3 <= 0.85 * c2[parent])]
        return out


# --- meta ------------------------------------------------------------------------------------------
def build_meta(layers: int, d_ffn: int, vocab: int, data: Data, samples: int, seed: int) -> dict:
    """As engine.meta.build_meta fills it for an OPT model recorded with default settings."""
    seq_len, n_seqs = data.seq_len, data.n_seqs
    n_tokens = n_seqs * seq_len
    primary = 0.0
    taus = sorted(set(EXTRA_TAUS) | {primary})
    d_model = max(d_ffn // 4, 1)
    config = {
        "_name_or_path": "synthetic/opt-66b-shaped", "activation_dropout": 0.0, "activation_function": "relu",
        "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": START_ID,
        "do_layer_norm_before": True, "dropout": 0.1, "enable_bias": True, "eos_token_id": START_ID,
        "ffn_dim": d_ffn, "hidden_size": d_model, "init_std": 0.02, "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt",
        "num_attention_heads": max(d_model // 128, 1), "num_hidden_layers": layers, "pad_token_id": 1,
        "prefix": "</s>", "use_cache": True, "vocab_size": vocab, "word_embed_proj_dim": d_model,
    }
    fingerprint = hashlib.sha256(json.dumps([config, "synthetic", seed], sort_keys=True).encode()).hexdigest()[:16]
    packed = Packed(data.tokens, data.domains, ["synthetic"], data.n_documents, False)
    per_shard = max(1, SHARD_TOKENS // seq_len)
    all_layers = list(range(layers))
    return {
        "tool_version": __version__,
        "schema_version": schema.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "spec": "synthetic:opt-66b", "name": f"synthetic OPT-66b-shaped ({layers}x{d_ffn}, seed {seed})",
            "family": "OPT", "model_type": "opt", "fingerprint": fingerprint, "n_layers": layers,
            "d_model": d_model, "d_ffn": d_ffn, "vocab_size": vocab, "activation": "relu", "gated": False,
            "dtype": "float16", "config": config,
        },
        "tokenizer": {"name": "synthetic (OPT-sized vocabulary)", "size": data.tok_size,
                      "start_id": START_ID, "sep_id": START_ID},
        "data": {
            "sources": [{"kind": "synthetic", "path": "bench/synthetic_cache.py", "size": None,
                         "documents": data.n_documents}],
            "field": "text", "seed": seed, "fingerprint": packed.fingerprint(), "seq_len": seq_len,
            "n_seqs_total": n_seqs, "tokens_total": n_tokens, "domain_names": ["synthetic"],
            "n_documents": data.n_documents,
            "notes": ["synthetic tokens and statistics from bench/synthetic_cache.py; no model was run"],
        },
        "recording": {
            "taus": taus, "primary_tau": primary, "primary_index": taus.index(primary),
            "firing_rule": f"relu: act(pre-activation) > {primary:g}", "layers": all_layers,
            "ngram_layers": [i for i in all_layers if i < layers // 2], "ngram_max_freq": NGRAM_MAX_FREQ,
            "calib_tokens": CALIB_TOKENS, "topk": TOPK, "samples": samples,
            "sample_rate": min(1.0, samples / n_tokens), "n_seqs_total": n_seqs, "part": [1, 1],
            "seq_range": [0, n_seqs], "part_tokens": n_tokens, "shard_tokens": SHARD_TOKENS,
            "n_shards": -(-n_seqs // per_shard), "batch_tokens": BATCH_TOKENS,
            "resident_layers": min(layers, 28), "hidden_on_disk": False,
            "weight_bytes_moved": int(max(layers - 28, 0) * 2 * (2 * d_model * d_ffn + 4 * d_model ** 2)
                                      * -(-n_tokens // BATCH_TOKENS)),
        },
    }


# --- shapes of the paper's curves --------------------------------------------------------------------
def dead_fraction(x: float) -> float:
    """Relative depth -> dead share: a bump in the first half up to ~70 % (OPT-66b, paper Fig. 1)."""
    return 0.005 + 0.70 * float(np.exp(-((x - 0.2) / 0.12) ** 2))


def detector_fractions(x: float) -> tuple[float, float, float]:
    """Share of alive neurons that are token, bigram and trigram detectors (n-gram layers only)."""
    return 0.035 - 0.04 * x, 0.012 - 0.01 * x, 0.008 - 0.006 * x


def positional_fraction(x: float) -> float:
    return 0.006 * float(np.exp(-x / 0.15)) + 0.0003


# --- positional neurons -----------------------------------------------------------------------------
def _positional_column(rng, kind: str, strong: bool, T: int, S: int, p: PositionalParams) -> np.ndarray:
    """Fire counts per position (0..S) for a neuron the positional analysis types as (kind, strong)."""
    near_hi = [c for c in range(S) if c / S >= 1 - p.extreme_eps]
    near_lo = [c for c in range(1, S + 1) if c / S <= p.extreme_eps]
    pos = np.arange(T)

    def levels(on: np.ndarray) -> np.ndarray:
        if strong:
            return np.where(on, S, 0)
        return np.where(on, rng.choice(near_hi, T), rng.choice([0] + near_lo, T))

    if kind == "oscillatory":
        cycles = rng.integers(3, max(3, min(12, T // (4 * p.min_run))) + 1)
        period = T / cycles
        duty = rng.uniform(0.35, 0.65)
        return levels(((pos + rng.uniform(0, period)) % period) < duty * period)
    if kind == "both_extremes":
        if rng.random() < 0.5:  # a step: fires always before (or after) a position, never on the other side
            on = pos < rng.integers(int(0.15 * T), int(0.85 * T))
        else:                   # a window of positions
            width = rng.integers(int(0.1 * T), int(0.4 * T))
            lo = rng.integers(int(0.1 * T), int(0.9 * T) - width)
            on = (pos >= lo) & (pos < lo + width)
        return levels(on if rng.random() < 0.7 else ~on)
    if kind == "one_extreme":
        edge = pos < rng.integers(int(0.1 * T), int(0.4 * T))
        if rng.random() < 0.5:
            edge = edge[::-1]
        middle = rng.binomial(S, rng.uniform(0.25, 0.6), T)
        if rng.random() < 0.6:  # always on near one end of the sequence
            extreme = np.full(T, S) if strong else rng.choice(near_hi, T)
        else:                   # never on there
            extreme = np.zeros(T, np.int64) if strong else rng.choice(near_lo, T)
        return np.where(edge, extreme, middle)
    # other: a smooth rise or fall between two middling frequencies, exact (strong) or noisy (weak)
    lo, hi = rng.uniform(0.12, 0.3), rng.uniform(0.7, 0.88)
    centre, width = rng.uniform(0.3 * T, 0.7 * T), rng.uniform(T / 12, T / 5)
    fr = lo + (hi - lo) / (1 + np.exp(-(pos - centre) / width))
    if rng.random() < 0.5:
        fr = fr[::-1]
    return np.rint(S * fr).astype(np.int64) if strong else rng.binomial(S, fr)


def positional_block(rng, n: int, T: int, S: int, p: PositionalParams):
    """n planted positional neurons -> ((T, n) int32 counts, kinds, strong), each checked with the real
    analysis and drawn again until it is typed as planned."""
    kinds = rng.choice(len(KINDS), n, p=[0.2, 0.3, 0.25, 0.25])
    strong = rng.random(n) < 0.5
    block = np.zeros((T, n), np.int32)
    todo = np.arange(n)
    for _ in range(50):
        for j in todo:
            block[:, j] = _positional_column(rng, KINDS[kinds[j]], bool(strong[j]), T, S, p)
        r = positional_layer(_pad_columns(block), S, p)
        got_kind = np.array([KINDS.index(k) if k else -1 for k in r.kind[:n]])
        todo = np.flatnonzero(~r.positional[:n] | (got_kind != kinds) | (r.strong[:n] != strong))
        if not len(todo):
            return block, kinds, strong
    raise RuntimeError(f"could not plant positional neurons of the planned types (seq_len {T}, {S} sequences)")


def _pad_columns(block: np.ndarray) -> np.ndarray:
    """A block for positional_layer whose neuron loop has no one-column-wide slice."""
    if block.shape[1] % 2048 == 1:
        return np.concatenate([block, np.zeros((block.shape[0], 1), block.dtype)], axis=1)
    return block


def positional_columns(pos_fire: np.ndarray, cols: np.ndarray, n_seqs: int, p: PositionalParams):
    """positional_layer(pos_fire) for the columns `cols` only (every other column is all zeros: mi 0,
    not positional), bit for bit. numpy's float sums over positions depend on the shape of the slice
    positional_layer works on (2048 neurons wide, the last one narrower), not on the other columns in
    it, so each column is analysed in a block as wide as the slice it falls in on the whole layer.
    -> {column: ({mi, mi_plugin, mi_chance, mi_null}, kind, strong, ranges)}."""
    from ffnscope.engine.analysis.positional import _CHUNK

    d = pos_fire.shape[1]
    out = {}
    width = np.minimum(_CHUNK, d - (cols // _CHUNK) * _CHUNK)
    for w in np.unique(width):
        mine = cols[width == w]
        for lo in range(0, len(mine), int(w)):
            part = mine[lo:lo + int(w)]
            block = np.zeros((pos_fire.shape[0], int(w)), pos_fire.dtype)
            block[:, :len(part)] = pos_fire[:, part]
            r = positional_layer(block, n_seqs, p)
            for j, column in enumerate(part.tolist()):
                mi = {key: getattr(r, key)[j] for key in ("mi", "mi_plugin", "mi_chance", "mi_null")}
                out[column] = (mi, r.kind[j], bool(r.strong[j]), r.ranges.get(j, []))
    return out


# --- one layer --------------------------------------------------------------------------------------
class LayerMaker:
    def __init__(self, rng, meta: dict, data: Data, eligible: dict[int, np.ndarray]):
        self.rng, self.meta, self.data, self.eligible = rng, meta, data, eligible
        self.d = meta["model"]["d_ffn"]
        self.T, self.S = data.seq_len, data.n_seqs
        self.N = self.T * self.S
        self.taus = np.array(meta["recording"]["taus"])
        self.pos_params, self.ngram_params = PositionalParams(), NgramParams()
        self.hostile_triggers = {1: [], 2: [], 3: []}

    # fires of planted detectors: every occurrence of their triggers, plus a few noise fires
    def detectors(self, n: int, neurons: np.ndarray, first_layer: bool):
        rng, pool = self.rng, self.eligible[n]
        m = len(neurons)
        if not m or not len(pool):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
        shares = [0.4, 0.25, 0.15, 0.1, 0.1] if n == 1 else [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]
        count = rng.choice(np.arange(1, len(shares) + 1), m, p=shares)
        owner = np.repeat(np.arange(m), count)
        trig = pool[rng.integers(0, len(pool), len(owner))]
        if first_layer:  # the hostile strings as (parts of) triggers
            V = self.data.vocab
            if n == 1:
                hostile = self.data.hostile_ids
            else:
                ph = self.data.phrases[:len(HOSTILE)].astype(np.int64)
                hostile = ph[:, 0] * V + ph[:, 1] if n == 2 else (ph[:, 0] * V + ph[:, 1]) * V + ph[:, 2]
            hostile = hostile[np.isin(hostile, pool)][:m]
            firsts = np.searchsorted(owner, np.arange(len(hostile)))
            trig[firsts] = hostile
            self.hostile_triggers[n] = hostile.tolist()
        # one trigger per last (n-1)-gram and neuron, so no shorter n-gram gets fired on at every occurrence
        last = trig % self.data.vocab ** (n - 1) if n > 1 else trig
        _, keep = np.unique(owner * (self.data.vocab ** max(n - 1, 1)) + last, return_index=True)
        keep = np.sort(keep)
        owner, trig = owner[keep], trig[keep]
        who, pos = self.data.positions(n, trig, owner)
        fires = np.bincount(who, minlength=m)
        noise = (NOISE_SHARE * fires).astype(np.int64)
        who = np.concatenate([who, np.repeat(np.arange(m), noise)])
        pos = np.concatenate([pos, rng.integers(0, self.N, noise.sum())])
        pairs = np.unique(neurons[who] * self.N + pos)
        return pairs // self.N, pairs % self.N, m

    def make(self, layer: int, is_ngram: bool) -> dict:
        rng, d, T, S, N = self.rng, self.d, self.T, self.S, self.N
        x = layer / max(self.meta["model"]["n_layers"] - 1, 1)
        perm = rng.permutation(d)
        n_dead = min(int(round(d * dead_fraction(x))), d - 1)
        alive = perm[n_dead:]
        n_pos = min(len(alive), max(4, int(round(d * positional_fraction(x)))))
        pos_neurons = np.sort(alive[:n_pos])
        rest = alive[n_pos:]
        F = np.zeros(d, np.int64)
        pos_fire = np.zeros((T, d), np.int32)
        block, kinds, strong = positional_block(rng, n_pos, T, S, self.pos_params)
        pos_fire[:, pos_neurons] = block
        F[pos_neurons] = block.sum(0)
        planned = {"positional": {k: int((kinds == i).sum()) for i, k in enumerate(KINDS)},
                   "positional_strong": int(strong.sum()), "detectors": {1: [], 2: [], 3: []}}
        det_neuron, det_pos = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        generic = rest
        if is_ngram:
            fractions = detector_fractions(x)
            sizes = [int(round(f * len(alive))) for f in fractions]
            start, unused = 0, []
            for n, size in zip((1, 2, 3), sizes):
                chosen = np.sort(rest[start:start + size])
                start += size
                who, where, made = self.detectors(n, chosen, layer == 0)
                if not made:  # no eligible trigger in this data: they fire like anyone else
                    unused.append(chosen)
                    chosen = chosen[:0]
                planned["detectors"][n] = chosen
                det_neuron.append(who)
                det_pos.append(where)
            generic = np.concatenate([rest[start:]] + unused)
        det_neuron, det_pos = np.concatenate(det_neuron), np.concatenate(det_pos)
        # n-gram detectors' fires are placed: their pos_fire and fire counts follow
        flat, counts = np.unique((det_pos % T) * d + det_neuron, return_counts=True)
        pos_fire.reshape(-1)[flat] += counts.astype(np.int32)
        F += np.bincount(det_neuron, minlength=d)
        # everyone else: log-uniform firing frequency
        freq = 10 ** rng.uniform(np.log10(3 / N), np.log10(0.25), len(generic))
        F[generic] = np.clip(np.rint(freq * N), 1, N)
        out = self._statistics(F, det_neuron, det_pos, pos_neurons, block)
        out.update(self._start_slot(out, pos_fire))
        out.update(pos_fire=pos_fire, planned=planned, nonzero_columns=np.union1d(pos_neurons, det_neuron))
        if is_ngram:
            counted = self._counted(F, det_neuron, det_pos)
            out["ngram_counted"] = counted
            g_mean = out["g_sum"] / np.maximum(F, 1)
            out["ngrams"] = self._ngram_counts(F, counted, det_neuron, det_pos, g_mean)
        return out

    def _statistics(self, F, det_neuron, det_pos, pos_neurons, block) -> dict:
        """Fire counts per threshold, g moments, g_max and top-k under an exponential model of the ReLU
        output above 0 (scale s per neuron), kept consistent with one another."""
        rng, d, taus, T, S = self.rng, self.d, self.taus, self.T, self.S
        s = np.exp(rng.normal(np.log(0.6), 0.5, d))
        J = len(taus)
        fire = np.zeros((J, d), np.int64)
        fire[0] = F
        for j in range(1, J):
            fire[j] = rng.binomial(fire[j - 1], np.exp(-(taus[j] - taus[j - 1]) / s))
        top = (fire > 0).sum(0) - 1                      # last threshold with fires; -1: dead
        alive = top >= 0
        lower = taus[np.maximum(top, 0)]
        upper = np.append(taus[1:], np.inf)[np.maximum(top, 0)]
        inside = lower + (np.where(np.isfinite(upper), upper, lower + 1) - lower) * rng.uniform(0.05, 0.95, d)
        beyond = taus[-1] + s * np.clip(np.log(np.maximum(fire[-1], 1)) + rng.gumbel(size=d), 0.05, None)
        g_max = np.where(alive, np.where(np.isfinite(upper), inside, beyond), 0.0).astype(np.float32)
        gm = g_max.astype(np.float64)
        Fs = np.maximum(F, 1)
        g_sum = F * s * np.exp(rng.normal(0, 0.1, d) / np.sqrt(Fs))
        g_sum = np.maximum(g_sum, (taus[:, None] * fire).max(0) + gm)
        g_sum = np.where(alive, np.minimum(g_sum, F * gm), 0.0)
        g_sumsq = np.clip(2 * g_sum ** 2 / Fs, np.maximum(g_sum ** 2 / Fs, gm ** 2), gm * g_sum)
        # top-k: one value per sequence, at most as many positive ones as sequences fired in
        k = TOPK
        seq_fired = np.minimum(F, S)
        positions = rng.integers(1, T, (k, d))
        seqs = (rng.integers(0, S, d)[None, :] + np.arange(k)[:, None]) % S
        det_take = self._detector_topk(det_neuron, det_pos, seq_fired)
        for j, n in enumerate(pos_neurons):             # positional: where they fire most (position 0 apart)
            col = block[1:, j]
            best = 1 + np.flatnonzero(col == col.max())
            positions[:, n] = best[rng.integers(0, len(best), k)]
        steps = s[None, :] * rng.exponential(size=(k - 1, d)) / np.arange(1, k)[:, None]
        value = gm[None, :] - np.vstack([np.zeros((1, d)), np.cumsum(steps, 0)])
        value = np.maximum(value, 1e-3 * s[None, :])
        slot = np.arange(k)[:, None, None]
        cap = np.where(slot >= fire[None, :, :], taus[None, :, None], np.inf).min(1)   # (k, d)
        value = np.minimum(value, cap)
        value[np.arange(k)[:, None] >= np.minimum(seq_fired, k)[None, :]] = 0.0
        index = seqs * T + np.where(value > 0, positions, 1)  # never fired in a sequence: act 0 from position 1
        index[:, det_take[0]] = det_take[1]
        value32 = value.astype(np.float32)  # ReLU: act is g, so the contexts' g is their value
        value32, index, topk_g = merge_topk([value32], [index.astype(np.int64)], [value32], k)
        return {"fire_count": fire, "g_sum": g_sum, "g_sumsq": g_sumsq, "g_max": g_max,
                "topk_value": value32, "topk_index": index, "topk_g": topk_g}

    def _start_slot(self, out: dict, pos_fire: np.ndarray) -> dict:
        """The start-token slot: act at position 0 of sequence 0; above 0 (and below the best context)
        only for neurons that fire at position 0."""
        fired = pos_fire[0] > 0
        value = np.where(fired, out["topk_value"][0] * self.rng.uniform(0.3, 0.9, self.d), 0.0).astype(np.float32)
        return {"start_value": value, "start_index": np.zeros(self.d, np.int64), "start_g": value.copy()}

    def _detector_topk(self, det_neuron, det_pos, seq_fired):
        """Detectors' top activations sit on their fires (one per sequence); the other slots are
        sequences they never fired in, at position 0."""
        T, S, k = self.T, self.S, TOPK
        at = det_pos % T != 0  # contexts come from positions >= 1 (position 0 has its own slot)
        det_neuron, det_pos = det_neuron[at], det_pos[at]
        if not len(det_neuron):
            return np.zeros(0, np.int64), np.zeros((k, 0), np.int64)
        neurons, local = np.unique(det_neuron, return_inverse=True)
        m = len(neurons)
        seq = det_pos // T
        key = local * S + seq
        _, first = np.unique(key, return_index=True)         # one fire per (neuron, sequence)
        first = first[np.argsort(local[first] + self.rng.random(len(first)), kind="stable")]
        owner = local[first]
        fired_seqs = np.bincount(owner, minlength=m)
        seq_fired[neurons] = fired_seqs
        mask = np.zeros((m, S), bool)
        mask[owner, seq[first]] = True
        index = np.zeros((k, m), np.int64)
        rank = np.arange(len(first)) - np.searchsorted(owner, np.arange(m))[owner]
        keep = rank < k
        index[rank[keep], owner[keep]] = det_pos[first[keep]]
        unused = np.argsort(mask, axis=1, kind="stable")[:, :k]   # sequences without a fire, lowest first
        fill = np.arange(k)[:, None] >= np.minimum(fired_seqs, k)[None, :]
        slot = np.maximum(np.arange(k)[None, :] - np.minimum(fired_seqs, k)[:, None], 0)
        spare = np.take_along_axis(unused, slot, 1).T
        index = np.where(fill, spare * T + 1, index)
        return neurons, index

    def _counted(self, F, det_neuron, det_pos) -> np.ndarray:
        """The recorder keeps n-gram counts for neurons firing at most ngram_max_freq on the calibration
        tokens (the first calib_tokens of the recording)."""
        T, S = self.T, self.S
        calib_seqs = max(1, min(S, CALIB_TOKENS // T))
        limit = NGRAM_MAX_FREQ * calib_seqs * T
        calib = self.rng.binomial(F, calib_seqs / S)
        exact = np.bincount(det_neuron[det_pos < calib_seqs * T], minlength=self.d)
        calib[np.unique(det_neuron)] = exact[np.unique(det_neuron)]
        return calib <= limit

    def _ngram_counts(self, F, counted, det_neuron, det_pos, g_mean) -> dict[int, Sparse]:
        """(n-gram, neuron) fire counts: all fires of detectors, 2-40 sampled fires of other counted
        alive neurons; for tokens also the sum of g at those fires (each fire at the neuron's mean g)."""
        rng, d, N, V = self.rng, self.d, self.N, self.data.vocab
        others = np.flatnonzero(counted & (F > 0))
        others = others[~np.isin(others, det_neuron)]
        sample = np.rint(10 ** rng.uniform(np.log10(2), np.log10(40), len(others))).astype(np.int64)
        take = np.minimum(F[others], sample)
        who = np.repeat(others, take)
        pairs = np.unique(np.concatenate([det_neuron * N + det_pos, who * N + rng.integers(0, N, len(who))]))
        neuron, pos = pairs // N, pairs % N
        out = {}
        for n in (1, 2, 3):
            valid = (pos % self.T) >= n
            gram, nn = self.data.keys[n][pos[valid]], neuron[valid]
            with_g = n in G_ORDERS
            if V ** n * d < 2 ** 62:
                keys, count = np.unique(gram * d + nn, return_counts=True)
                of = (keys % d).astype(np.int32)
                out[n] = Sparse(keys // d, of, count.astype(np.int64), count * g_mean[of] if with_g else None)
            else:
                out[n] = Sparse.reduce([Sparse(gram, nn.astype(np.int32), np.ones(len(gram), np.int64),
                                               g_mean[nn] if with_g else None)], with_g)
        return out


# --- writing ----------------------------------------------------------------------------------------
def _zero_chunk(shape, dtype, chunks) -> tuple[int, bytes]:
    """The stored bytes of one all-zero chunk, as HDF5 compresses it with the cache's filters."""
    import io

    with h5py.File(io.BytesIO(), "w") as f:
        dset = f.create_dataset("x", shape=chunks, dtype=dtype, chunks=chunks, **_GZIP)
        dset[...] = 0
        return dset.id.read_direct_chunk((0,) * len(shape))


def _put_pos_fire(group: h5py.Group, pos_fire: np.ndarray, nonzero_columns: np.ndarray, zero_cache: dict) -> None:
    """As cache.store._put(group, "pos_fire", pos_fire) stores it, writing only the chunks that hold a
    fire through the filters and the all-zero ones as the precompressed bytes HDF5 makes for them."""
    if pos_fire.size < 4096:
        _put(group, "pos_fire", pos_fire)
        return
    dset = group.create_dataset("pos_fire", shape=pos_fire.shape, dtype=pos_fire.dtype, **_GZIP)
    cr, cc = dset.chunks
    T, d = pos_fire.shape
    R, C = -(-T // cr), -(-d // cc)
    if dset.chunks not in zero_cache:
        zero_cache[dset.chunks] = _zero_chunk(pos_fire.shape, pos_fire.dtype, dset.chunks)
    mask_value, zero = zero_cache[dset.chunks]
    busy = np.zeros((R, C), bool)
    if len(nonzero_columns):
        rows, which = np.nonzero(pos_fire[:, nonzero_columns])
        busy[rows // cr, nonzero_columns[which] // cc] = True
    for i in range(R):
        r0, r1 = i * cr, min((i + 1) * cr, T)
        edges = np.flatnonzero(np.diff(np.r_[0, busy[i].astype(np.int8), 0]))
        for a, b in zip(edges[::2], edges[1::2]):
            dset[r0:r1, a * cc:min(b * cc, d)] = pos_fire[r0:r1, a * cc:min(b * cc, d)]
        for j in np.flatnonzero(~busy[i]):
            dset.id.write_direct_chunk((r0, j * cc), zero, mask_value)


def _write_results(f: h5py.File, results: list[store.Result], recording: str) -> None:
    """What cache.analysis_store.write_results puts into the copy of the cache."""
    for result in results:
        store.put_result(f, result, recording)


# --- analyses ---------------------------------------------------------------------------------------
def _suppression_rows(rng, layer: int, x: float, detectors: np.ndarray, triggers: list[np.ndarray],
                      tok_size: int, hostile: np.ndarray, top: int) -> dict:
    """What suppression_layer returns for these token detectors, drawn instead of projected: deeper
    detectors more often suppress their own triggers (paper Sec. 4.4)."""
    m = len(detectors)
    picks = np.zeros((m, 3 * top), np.int64)
    todo = np.arange(m)
    while len(todo):  # 3 * top distinct tokens per row
        picks[todo] = rng.integers(len(SPECIALS), tok_size, (len(todo), 3 * top))
        ordered = np.sort(picks[todo], 1)
        todo = todo[(ordered[:, 1:] == ordered[:, :-1]).any(1)]
    promoted, suppressed, spare = picks[:, :top], picks[:, top:2 * top], picks[:, 2 * top:]
    suppresses = rng.random(m) < 0.35 + min(x, 0.5)
    for i in range(m):  # rows are few (one per token detector)
        t = np.unique(triggers[i])[:top]
        others = spare[i][~np.isin(spare[i], t)]
        if suppresses[i]:  # the triggers lead the suppressed list
            rest = suppressed[i][~np.isin(suppressed[i], t)]
            suppressed[i] = np.concatenate([t, rest, others])[:top]
        promoted[i] = np.concatenate([promoted[i][~np.isin(promoted[i], t)], others])[:top]
    if m and layer == 0 and len(hostile):  # hostile strings among the promoted tokens too
        h = hostile[:top]
        promoted[0] = np.concatenate([h, promoted[0][~np.isin(promoted[0], h)]])[:top]
    promoted_score = np.sort(rng.gamma(2.0, 0.6, (m, top)).astype(np.float32), 1)[:, ::-1]
    suppressed_score = -np.sort(rng.gamma(2.0, 0.6, (m, top)).astype(np.float32), 1)[:, ::-1]
    score = np.where(suppresses, -rng.uniform(1.5, 6.0, m), rng.uniform(0.2, 3.0, m)).astype(np.float32)
    g_at = rng.uniform(0.5, 3.0, m).astype(np.float32)  # ReLU: g is positive at every firing
    rank = np.where(suppresses, rng.uniform(0.0, 0.05, m), rng.uniform(0.3, 1.0, m)).astype(np.float32)
    return {"neuron": detectors.astype(np.int32), "promoted": promoted, "promoted_score": promoted_score,
            "suppressed": suppressed, "suppressed_score": suppressed_score, "trigger_g": g_at,
            "trigger_logit_z": score, "trigger_rank": rank, "suppresses": score < 0,
            "layer": np.full(m, layer, np.int64)}


class Analyses:
    """Accumulates, layer by layer, what engine.analysis.run.Analyzer stores, with the real analysis
    functions (dead through Analyzer._dead itself)."""

    def __init__(self, meta: dict, data: Data):
        self.meta, self.data = meta, data
        self.layers = meta["recording"]["layers"]
        self.ngram_layers = meta["recording"]["ngram_layers"]
        self.fire_count: dict[int, np.ndarray] = {}
        self.g_sumsq: dict[int, np.ndarray] = {}
        self.ngram = {1: [], 2: [], 3: []}
        self.pos = {key: [] for key in POSITIONAL_COLUMNS}
        self.ranges: list[tuple] = []
        self.supp: list[dict] = []
        self.params = {"ngrams": NgramParams(), "positional": PositionalParams(), "suppression": SuppressionParams()}

    def add(self, rng, layer: int, made: dict) -> dict:
        """Analyse one generated layer; -> what was found, for checking against what was planted."""
        d = self.meta["model"]["d_ffn"]
        self.fire_count[layer] = made["fire_count"]
        self.g_sumsq[layer] = made["g_sumsq"]
        found = {}
        cols = made["nonzero_columns"]
        mi = {key: np.zeros(d) for key in ("mi", "mi_plugin", "mi_chance", "mi_null")}
        positional, strong = np.zeros(d, bool), np.zeros(d, bool)
        kind = np.zeros(d, np.uint8)
        analysed = positional_columns(made["pos_fire"], cols, self.data.n_seqs, self.params["positional"])
        for column in sorted(analysed):  # ranges in neuron order, as Analyzer._positional lists them
            value, k, s, spans = analysed[column]
            for key in mi:
                mi[key][column] = value[key]
            if k:
                positional[column], kind[column], strong[column] = True, KINDS.index(k) + 1, s
            self.ranges += [(layer, column, a, b) for a, b in spans]
        for key, value in ({**mi, "positional": positional, "kind": kind, "strong": strong}).items():
            self.pos[key].append(value)
        found["positional"] = {k: int((kind[positional] == i + 1).sum()) for i, k in enumerate(KINDS)}
        found["positional_strong"] = int((strong & positional).sum())
        if layer in self.ngram_layers:
            x = layer / max(len(self.layers) - 1, 1)
            for n in (1, 2, 3):
                result = ngram_layer(made["ngrams"][n], self.data.counts[n], made["ngram_counted"], n,
                                     self.params["ngrams"])
                self.ngram[n].append(result)
                found[n] = np.flatnonzero(result.detector)
            r1 = self.ngram[1][-1]
            triggers = [r1.covered_gram[r1.covered_neuron == i] for i in found[1]]
            self.supp.append(_suppression_rows(rng, layer, x, found[1], triggers, self.data.tok_size,
                                               self.data.hostile_ids, self.params["suppression"].top))
        return found

    def results(self) -> list[store.Result]:
        d = self.meta["model"]["d_ffn"]
        n_tokens = self.data.tokens.size
        reader = SimpleNamespace(meta=self.meta, n_tokens=n_tokens, layers=self.layers, status=schema.COMPLETE,
                                 array=lambda layer, name: {"fire_count": self.fire_count,
                                                            "g_sumsq": self.g_sumsq}[name][layer])
        dead = Analyzer(reader, {}, log=lambda _m: None)._dead()
        # ngrams: as Analyzer._ngrams assembles them
        ngrams = store.Result("ngrams", self.params["ngrams"].as_dict())
        ngrams.put("layers", np.array(self.ngram_layers, np.int64))
        for n in (1, 2, 3):
            put_ngram_order(ngrams, n, self.ngram_layers, self.ngram[n], d)
        # positional: as Analyzer._positional
        positional = store.Result("positional", self.params["positional"].as_dict())
        put_positional(positional, self.layers, self.pos, self.ranges,
                       call_limit(self.data.n_seqs, self.data.seq_len, self.params["positional"]))
        # suppression: as Analyzer._suppression concatenates its rows
        suppression = store.Result("suppression", self.params["suppression"].as_dict(),
                                   {"ngrams": self.params["ngrams"].as_dict()})
        keys = SUPPRESSION_KEYS + ("layer",)
        put_suppression_rows(suppression, {key: [rows[key] for rows in self.supp] for key in keys},
                             self.params["suppression"].top)
        return [dead, ngrams, positional, suppression]


# --- the generator ----------------------------------------------------------------------------------
def generate(path, layers: int = 64, d_ffn: int = 36864, seq_len: int = 2048, vocab: int = 50272,
             seed: int = 0, n_seqs: int = 64, samples: int = 0, log=None) -> dict:
    """Write a synthetic cache to `path`; -> what was planted (per-layer lists) and where it went."""
    log = log or (lambda _m: None)
    if seq_len < 64 or n_seqs < TOPK or vocab < 300 or d_ffn < 64 or layers < 1:
        raise ValueError("need seq_len >= 64, n_seqs >= 16, vocab >= 300, d_ffn >= 64 and layers >= 1")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    path = Path(path)
    data = Data(rng, vocab, seq_len, n_seqs)
    eligible = data.eligible(data.tokens.size)
    words, pieces = _vocabulary(rng, vocab, data.tok_size, data.rank_to_id, data.hostile_ids)
    meta = build_meta(layers, d_ffn, vocab, data, samples, seed)
    ngram_layers = set(meta["recording"]["ngram_layers"])
    maker = LayerMaker(rng, meta, data, eligible)
    analyses = Analyses(meta, data)
    n_tokens = data.tokens.size
    planted = {"path": str(path), "layers": layers, "d_ffn": d_ffn, "seq_len": seq_len, "n_seqs": n_seqs,
               "vocab": vocab, "n_tokens": n_tokens, "dead": [], "token_detectors": [], "bigram_detectors": [],
               "trigram_detectors": [], "positional": {k: [] for k in KINDS}, "positional_strong": [],
               "mismatches": []}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    zero_cache: dict = {}
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = schema.FORMAT
            f.attrs["schema_version"] = schema.SCHEMA_VERSION
            f.attrs["status"] = schema.COMPLETE
            f.attrs["shards_done"] = meta["recording"]["n_shards"]
            f.attrs["meta"] = json.dumps(meta)
            group = f.create_group("data")
            _put(group, "tokens", data.tokens)
            _put(group, "seq_index", np.arange(n_seqs, dtype=np.int64))
            _put(group, "domains", data.domains)
            _put(group, "unigram", data.unigram)
            for n, grams in data.grams.items():
                _put(group, f"gram{n}/gram", grams.gram)
                _put(group, f"gram{n}/count", grams.count)
            for layer in range(layers):
                made = maker.make(layer, layer in ngram_layers)
                group = f.create_group(schema.layer_group(layer))
                for name in schema.LAYER_ARRAYS:
                    if name == "pos_fire":
                        _put_pos_fire(group, made["pos_fire"], made["nonzero_columns"], zero_cache)
                    else:
                        _put(group, name, made[name])
                if layer in ngram_layers:
                    _put(group, "ngram_counted", made["ngram_counted"])
                    for n, sparse in made["ngrams"].items():
                        for column in schema.NGRAM_COLUMNS:
                            if getattr(sparse, column) is not None:
                                _put(group, f"ngram{n}/{column}", getattr(sparse, column))
                found = analyses.add(rng, layer, made)
                _record(planted, layer, made, found)
                del made
                if layer % 8 == 7 or layer == layers - 1:
                    log(f"  layer {layer + 1}/{layers}  {time.perf_counter() - started:.0f} s")
            _put_strings(f, "tokenizer/vocab", words)
            _put_strings(f, "tokenizer/pieces", pieces)
            _write_samples(f.create_group("samples"), rng, meta, maker, samples)
            key = store.recording_key(SimpleNamespace(meta=meta, n_tokens=n_tokens, status=schema.COMPLETE))
            _write_results(f, analyses.results(), key)
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    supp = analyses.supp
    planted.update(
        ranges=len(analyses.ranges), suppression_rows=int(sum(len(r["neuron"]) for r in supp)),
        suppresses=int(sum(r["suppresses"].sum() for r in supp)),
        hostile_tokens={int(t): s for t, s in zip(data.hostile_ids.tolist(), HOSTILE)},
        hostile_triggers={k: v for k, v in zip(("token", "bigram", "trigram"), maker.hostile_triggers.values())},
        seconds=time.perf_counter() - started, bytes=path.stat().st_size)
    return planted


def _record(planted: dict, layer: int, made: dict, found: dict) -> None:
    """Note what was planted in a layer, and any difference from what the real analyses found there."""
    primary = made["fire_count"][0]
    planted["dead"].append(int((primary == 0).sum()))
    plan = made["planned"]
    for n, name in ((1, "token_detectors"), (2, "bigram_detectors"), (3, "trigram_detectors")):
        chosen = np.asarray(plan["detectors"][n])
        planted[name].append(len(chosen))
        if n in found and not np.array_equal(np.sort(chosen), found[n]):
            planted["mismatches"].append(f"layer {layer}: {name} planted {len(chosen)}, found {len(found[n])}")
    for kind in KINDS:
        planted["positional"][kind].append(plan["positional"][kind])
    planted["positional_strong"].append(plan["positional_strong"])
    if found["positional"] != plan["positional"] or found["positional_strong"] != plan["positional_strong"]:
        planted["mismatches"].append(f"layer {layer}: positional planted {plan['positional']}, "
                                     f"found {found['positional']}")


def _write_samples(group: h5py.Group, rng, meta: dict, maker: LayerMaker, samples: int) -> None:
    """samples/index and samples/acts as write_state stores them (acts uncompressed, one layer per chunk
    row); the activations are drawn per neuron at its layer-average frequency."""
    n_layers, d, N, T = len(meta["recording"]["layers"]), maker.d, maker.N, maker.T
    candidates = np.flatnonzero(np.arange(N) % T != 0)
    index = np.sort(rng.choice(candidates, min(samples, len(candidates)), replace=False)).astype(np.int64)
    _put(group, "index", index)
    n = len(index)
    shape = (n_layers, n, d)
    chunks = (1, max(1, min(n, 256)), d) if n else None
    acts = group.create_dataset("acts", shape=shape, dtype=np.float16, chunks=chunks)
    for layer in range(n_layers if n else 0):
        freq = 10 ** rng.uniform(-4, -0.6, d)
        fires = rng.random((n, d)) < freq
        acts[layer] = np.where(fires, rng.exponential(0.6, (n, d)), 0.0).astype(np.float16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--d-ffn", type=int, default=36864)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--seqs", type=int, default=64, help="sequences of --seq-len tokens (default 64)")
    parser.add_argument("--samples", type=int, default=0, help="activation samples to store (default none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"writing {args.out}: {args.layers} layers x {args.d_ffn:,} neurons, {args.seqs} x {args.seq_len} tokens, "
          f"vocabulary {args.vocab:,}", flush=True)
    planted = generate(args.out, layers=args.layers, d_ffn=args.d_ffn, seq_len=args.seq_len, vocab=args.vocab,
                       seed=args.seed, n_seqs=args.seqs, samples=args.samples, log=_log)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    L = args.layers
    print(f"generated in {planted['seconds']:.1f} s; file {planted['bytes'] / 2**30:.2f} GiB "
          f"({planted['bytes']:,} bytes); peak RSS {peak / 2**30:.2f} GiB")
    print(f"planted: {sum(planted['dead']):,} dead of {L * args.d_ffn:,} neurons; detectors "
          f"{sum(planted['token_detectors']):,} token, {sum(planted['bigram_detectors']):,} bigram, "
          f"{sum(planted['trigram_detectors']):,} trigram; positional "
          + ", ".join(f"{sum(v):,} {k}" for k, v in planted["positional"].items())
          + f" ({sum(planted['positional_strong']):,} strong, {planted['ranges']:,} ranges); "
          f"{planted['suppression_rows']:,} suppression rows")
    for problem in planted["mismatches"]:
        print(f"warning: {problem}")
    return 1 if planted["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
