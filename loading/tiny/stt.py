"""Tiny Whisper (random weights) saved with a WhisperProcessor (feature extractor + tokenizer).

Pitfalls:
- max_source_positions must be 1500: the feature extractor always pads to 30 s = 3000 frames of 80
  mel bins, and the encoder's stride-2 conv halves that to 1500 positions.
- Token layout mirrors real Whisper (ids relative to the base vocab): <|endoftext|>,
  <|startoftranscript|>, languages, <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
  <|nocaptions|>, <|notimestamps|>, then the 1501 timestamp tokens <|0.00|>..<|30.00|>. Whisper's
  generate derives timestamp_begin = no_timestamps_token_id + 1, and the tokenizer's
  _decode_with_timestamps uses the last special id + 1, so timestamps must directly follow
  <|notimestamps|> and must NOT be special tokens.
- A random Whisper emits timestamp tokens, and the generate seek loop then keeps going far past
  max_new_tokens; all timestamp tokens are in suppress_tokens, so generate stops at max_new_tokens.
- Batched generate needs a pad token: pad = <|endoftext|> as in real Whisper.
- Word timestamps (`return_token_timestamps`) need `alignment_heads` in the generation config: the
  (layer, head) pairs whose cross-attention follows the audio. Real checkpoints list the heads found to
  align; the tiny model names every head of its last decoder layer, as Whisper does for a checkpoint
  without a list, so DTW over their averaged cross-attention gives each token a time, for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .tokenizer import train_bpe

# First languages of Whisper's own order; "en" must be present for language="en".
LANGUAGES = ("en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr")
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps


def build_whisper_tokenizer(vocab_size: int = 384) -> Any:
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    raw = train_bpe(vocab_size, special_tokens=())
    model = json.loads(raw.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = WhisperTokenizer(vocab=vocab, merges=merges)  # adds <|endoftext|> as unk/bos/eos
    specials = (
        ["<|startoftranscript|>"]
        + [f"<|{lang}|>" for lang in LANGUAGES]
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens(
        [AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(N_TIMESTAMPS)]
    )
    tok.pad_token = "<|endoftext|>"
    return tok


def build_stt(dest: Path, *, seed: int = 0) -> Path:
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tok = build_whisper_tokenizer()
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    no_ts = ids("<|notimestamps|>")
    timestamps = list(range(no_ts + 1, no_ts + 1 + N_TIMESTAMPS))
    assert timestamps[-1] == ids("<|30.00|>") and len(tok) == timestamps[-1] + 1
    space = ids("Ġ")
    # Real Whisper suppresses startoftranscript/translate/transcribe/startoflm/startofprev/nocaptions;
    # generate reads suppress_tokens[-2] as <|startofprev|> when prev_sot_token_id is unset.
    suppress = sorted(set(timestamps) | {sot}) + [
        ids(t) for t in ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>")
    ]

    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=sot,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        # suppress settings live in generation_config only: duplicating them in the model config
        # makes generate warn about mixing a generation_config with generation kwargs.
        suppress_tokens=None,
        begin_suppress_tokens=None,
        init_std=0.2,  # like the LLM: 0.02 makes greedy decoding repeat one token
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)

    gen = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_new_tokens=32,
        do_sample=False,
        forced_decoder_ids=None,
        suppress_tokens=suppress,
        begin_suppress_tokens=[space, eot],
        is_multilingual=True,
        lang_to_id={f"<|{lang}|>": ids(f"<|{lang}|>") for lang in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=no_ts,
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        return_timestamps=False,
        alignment_heads=[[config.decoder_layers - 1, head] for head in range(config.decoder_attention_heads)],
    )
    model.generation_config = gen
    model.save_pretrained(dest)

    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(dest)
    return dest
