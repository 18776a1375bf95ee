"""The tokenizer routes' work in an LLM or VLM replica, which holds the tokenizer (chat_server.py calls
these): token strings, ids checked and decoded, the tokenizer's configuration."""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequestError

# Keys of a tokenizer's init_kwargs that say where and how it was loaded on this server, not what it is.
LOADING_KEYS = frozenset({"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "special_tokens_map_file",
                          "gguf_file", "is_local", "local_files_only", "cache_dir", "token", "revision"})
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_DROP = object()


def token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id as the vocabulary spells it (vLLM's `token_strs`)."""
    return [str(token) for token in tokenizer.convert_ids_to_tokens(ids)]


def check_ids(tokenizer: Any, ids: list[int], model: str, limit: int) -> None:
    """/detokenize's ids: at most `limit` (the model's context), each in the tokenizer's vocabulary. An id
    past it decodes to nothing in a fast tokenizer: a silent '' was no answer to a client's mistake."""
    if len(ids) > limit:
        raise InvalidRequestError(f"{len(ids)} tokens; model {model!r} reads at most {limit} (its context): "
                                  "send fewer", param="tokens")
    vocabulary = len(tokenizer)
    for index, token in enumerate(ids):
        if token >= vocabulary:
            raise InvalidRequestError(f"token id {token} (tokens[{index}]) is not in the vocabulary of model "
                                      f"{model!r}, which has {vocabulary} tokens (ids 0-{vocabulary - 1})",
                                      param=f"tokens.{index}")


def detokenize(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids`, special tokens included (as vLLM's /detokenize): a chat's tokens come back as
    the prompt the template wrote."""
    return tokenizer.decode(ids)


def tokenizer_info(tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    """The tokenizer's configuration as vLLM's /tokenizer_info gives it: its init_kwargs (what
    tokenizer_config.json set) less where it was loaded from, its special tokens as text, its class, and
    the template chats are rendered with."""
    info: dict[str, Any] = {}
    for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items():
        if key not in LOADING_KEYS and (safe := _json_value(value)) is not _DROP:
            info[key] = safe
    for name in SPECIAL_TOKENS:  # the tokenizer's own: init_kwargs lacks those set by special_tokens_map.json
        info[name] = getattr(tokenizer, name, None)
    info["tokenizer_class"] = type(tokenizer).__name__
    info["chat_template"] = chat_template
    return info


def _json_value(value: Any) -> Any:
    """`value` as JSON: an AddedToken as its text (vLLM's rule); anything else that is not JSON left out."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(getattr(value, "content", None), str):
        return value.content
    if isinstance(value, (list, tuple)):
        return [item for item in map(_json_value, value) if item is not _DROP]
    if isinstance(value, dict):
        out = {str(key): _json_value(item) for key, item in value.items()}
        return {key: item for key, item in out.items() if item is not _DROP}
    return _DROP
