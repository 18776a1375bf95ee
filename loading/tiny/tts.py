"""Tiny VITS text-to-speech model (random weights) with a character-level VitsTokenizer.

Notes / pitfalls:
- phonemize=False: the MMS-style char tokenizer works without the `phonemizer`/espeak packages.
  normalize=True lowercases; characters outside the vocab map to <unk>.
- Output is stochastic: VITS samples noise in the duration predictor and the prior (noise_scale,
  noise_scale_duration), so both the waveform AND its length change from call to call. For
  reproducible output call `torch.manual_seed(...)` right before the forward pass (or use
  `transformers.set_seed`).
- Empty text: the tokenizer yields input_ids of shape (1, 0) and VitsModel's forward raises
  `RuntimeError: narrow(): length must be non-negative`. Callers must reject empty input.
- Waveform length = sum(predicted durations) * prod(upsample_rates); small upsample rates (hop 64
  instead of 256) keep the vocoder cheap. Random durations are >= 1 frame per input token.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

PAD, UNK = "<pad>", "<unk>"
# id 0 must be the blank/pad: VitsTokenizer(add_blank=True) intersperses id 0 between characters.
CHARS = [PAD] + list(string.ascii_lowercase) + list(string.digits) + list(" .,!?'-:;\"") + [UNK]
SAMPLING_RATE = 16000


def build_vits_tokenizer():
    from transformers import VitsTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps({c: i for i, c in enumerate(CHARS)}, ensure_ascii=False))
        return VitsTokenizer(
            str(vocab_file), pad_token=PAD, unk_token=UNK, add_blank=True, normalize=True, phonemize=False
        )


def build_tts(dest: Path, *, seed: int = 0) -> Path:
    from transformers import VitsConfig, VitsModel

    tok = build_vits_tokenizer()
    config = VitsConfig(
        vocab_size=len(CHARS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        flow_size=32,
        spectrogram_bins=65,
        upsample_initial_channel=32,
        upsample_rates=[8, 8],
        upsample_kernel_sizes=[16, 16],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        duration_predictor_filter_channels=32,
        duration_predictor_num_flows=2,
        prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=2,
        posterior_encoder_num_wavenet_layers=2,
        sampling_rate=SAMPLING_RATE,
        pad_token_id=0,
        layerdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitsModel(config)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
