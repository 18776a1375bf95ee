"""The log probabilities of a prompt's own tokens: /v1/completions' `echo` with `logprobs`.

This is how evaluation harnesses score a text through an OpenAI-compatible server: lm-evaluation-harness's
`local-completions` sends the context and the continuation as one prompt with `echo: true`, `logprobs: 1`
and `max_tokens: 1`, then sums `token_logprobs` over the continuation and compares each with the best of
its `top_logprobs`. Each prompt token's figure is the log-softmax of the model's raw scores at the
position before it, as a sampled token's is (row_logits); the first token has none (nothing before it).

Runs on the inference thread. The prompt goes through the model CHUNK_TOKENS at a time with its KV cache,
so the scores held at once are CHUNK_TOKENS x the vocabulary, not the whole prompt's (8k tokens of a
128k-token vocabulary would be 4 GB of float32).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from .decode_loop import cache_argument
from .row_logits import Entry

CHUNK_TOKENS = 256


def prompt_logprobs(loaded: Any, ids: list[int], top: int) -> list[Entry | None]:
    """One entry per token of `ids` (None for the first), each with the `top` most likely tokens at
    its position."""
    entries: list[Entry | None] = [None] if ids else []
    with loaded.active() as model, torch.inference_mode():
        cache, argument = DynamicCache(), cache_argument(model)
        device = loaded.model.device
        for start in range(0, len(ids) - 1, CHUNK_TOKENS):
            chunk = torch.tensor([ids[start:start + CHUNK_TOKENS]], device=device)
            out = model(input_ids=chunk, use_cache=True, **{argument: cache})
            # row i scores the token after chunk position i; the chunk's last row scores the next chunk's first
            targets = ids[start + 1:start + 1 + chunk.shape[1]]
            logprobs = torch.log_softmax(out.logits[0, :len(targets)].float(), dim=-1)
            picked = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
            if top:  # read off the device once per chunk, not per token (each .tolist() is a copy and a sync)
                best = torch.topk(logprobs, top, dim=-1)
                alternatives = [list(zip(tokens, values, strict=True))
                                for tokens, values in zip(best.indices.tolist(), best.values.tolist(), strict=True)]
            else:
                alternatives = [[] for _ in targets]
            entries.extend(zip(targets, picked, alternatives, strict=True))
    return entries
