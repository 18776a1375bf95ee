"""Shared byte-level BPE tokenizer for the tiny models, trained offline with `tokenizers`.

WHY a trained tokenizer instead of a hand-written vocab: byte-level BPE over a small English
corpus gives real merges ("the", " and", ...), so encode/decode/chat templates behave exactly like
a Hub tokenizer (multi-byte chars, spaces as "Ġ", special tokens never split), yet it is built in
milliseconds with no download. Training is deterministic for a fixed corpus and vocab size.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# A few paragraphs of plain English: enough for ~250 merges over the 256-byte alphabet.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still speak, even if it says
nothing sensible: every word it writes is chosen from the same vocabulary that a large model
would use, and the tokenizer that turns text into numbers is the part that users see first.
Hello world! How are you today? I am fine, thank you. What is the weather like in the city?
It is sunny and warm, with a light breeze from the west, and the river is calm this morning.

Once upon a time there was a little robot who lived in a quiet house at the end of a long road.
Every morning the robot opened the windows, watered the plants and listened to the birds. In the
evening it read books about the stars, the sea, the mountains and the people who travel between
them. The robot did not understand everything it read, but it liked the sound of the words.

Speech recognition turns audio into text, and speech synthesis turns text into audio. A vision
language model looks at an image and answers questions about it: what color is the car, how many
people are in the picture, what is written on the sign. All of these models share the same idea:
numbers in, numbers out, and a tokenizer at each end to translate between people and machines.

Please summarize the following paragraph in one sentence. Answer the question briefly. Translate
this sentence into French. Write a short poem about autumn leaves. List three facts about the moon.
The numbers are 0 1 2 3 4 5 6 7 8 9 10 100 1000, and the year is 2024.
"""

# ChatML, as used by Qwen and many other chat models.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_SPECIALS = (ENDOFTEXT, IM_START, IM_END)

# ChatML template. Content may be a string or a list of OpenAI-style parts; text parts are
# concatenated, image parts become `image_token` when one is given (VLM) and are dropped otherwise.
_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}__IMAGE__"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chatml_template(image_token: str | None = None) -> str:
    return _CHATML_TEMPLATE.replace("__IMAGE__", "{{ '" + image_token + "' }}" if image_token else "")


def train_bpe(vocab_size: int = 512, special_tokens: tuple[str, ...] = CHATML_SPECIALS) -> Tokenizer:
    """Byte-level BPE trained on CORPUS. Special tokens get the first ids (0..n-1)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False + use_regex=True is the GPT-2/Qwen convention.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # Seed the full byte alphabet so any UTF-8 input is encodable (no unknown tokens).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def build_chatml_tokenizer(extra_special_tokens: tuple[str, ...] = (), vocab_size: int = 512) -> Any:
    """A PreTrainedTokenizerFast with ChatML specials, left padding and a ChatML chat template.

    `extra_special_tokens` (e.g. "<image>") are trained in as specials so they have fixed ids and
    are never split. pad = <|endoftext|>, eos = <|im_end|> (end of an assistant turn), no bos.
    """
    from transformers import PreTrainedTokenizerFast

    image_token = "<image>" if "<image>" in extra_special_tokens else None
    raw = train_bpe(vocab_size, CHATML_SPECIALS + tuple(extra_special_tokens))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        # Left padding: decoder-only batched generation appends after the prompt.
        padding_side="left",
        chat_template=chatml_template(image_token),
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    if extra_special_tokens:
        # Register them as additional specials so skip_special_tokens drops them on decode.
        tok.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tok
