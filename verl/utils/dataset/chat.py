"""Chat-template rendering, truncation and padding shared by the RL and SFT datasets."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

TRUNCATION_MODES = ("error", "left", "right", "middle")


def require_chat_template(tokenizer: Any, what: str = "dataset") -> None:
    """Fail early, with the fix, when ``tokenizer`` cannot format chat messages."""
    if getattr(tokenizer, "chat_template", None):
        return
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    raise ValueError(f"{what}: tokenizer {name!r} has no chat template, so chat prompts cannot be formatted. "
                     f"Use an instruct/chat model's tokenizer, set actor_rollout_ref.model.custom_chat_template "
                     f"(a Jinja template), or add a \"chat_template\" entry to the model's tokenizer_config.json "
                     f"(e.g. build a model with `python -m verl.models.tiny --out DIR`, whose tokenizer has one).")


def render_chat(tokenizer: Any,
                messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool,
                tools: Any = None,
                **template_kwargs: Any) -> str:
    """The chat template applied to ``messages`` as text (tokenised separately, without extra special tokens)."""
    kwargs = dict(template_kwargs)
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         tokenize=False,
                                         **kwargs)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added (the chat template already placed its special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (as most causal LMs are padded) when it has none."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token before "
                         "building datasets.")
    return int(pad)


def check_truncation(mode: str, key: str = "data.truncation", allowed: Sequence[str] = TRUNCATION_MODES) -> str:
    if mode not in allowed:
        raise ValueError(f"{key}={mode!r} is not supported; use one of {list(allowed)}.")
    return mode


def truncate(ids: Sequence[int], max_length: int, mode: str) -> list[int]:
    """Cut ``ids`` to ``max_length``: ``left`` keeps the end, ``right`` the start, ``middle`` both ends.

    ``error`` is handled by callers, which know the row and config key to name.
    """
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if mode == "left":
        return ids[len(ids) - max_length:]
    if mode == "right":
        return ids[:max_length]
    if mode == "middle":
        head = max_length // 2
        return ids[:head] + ids[len(ids) - (max_length - head):]
    raise ValueError(f"cannot truncate with mode {mode!r}")


def pad_to_length(ids: Sequence[int], max_length: int, pad_id: int,
                  left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of exactly ``max_length`` (ids must already fit)."""
    n = len(ids)
    if n > max_length:
        raise ValueError(f"sequence of {n} tokens does not fit max_length={max_length}")
    input_ids = torch.full((max_length,), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(max_length, dtype=torch.long)
    if n:
        sl = slice(max_length - n, max_length) if left_pad else slice(0, n)
        input_ids[sl] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[sl] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the valid tokens; left padding gets 0 and right padding repeats the last position."""
    return torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)


def tokenize_conversation(tokenizer: Any,
                          messages: Sequence[Mapping[str, Any]],
                          tools: Any = None,
                          **template_kwargs: Any) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a mask that is 1 exactly on the assistant turns' tokens.

    The conversation is cut at the text offsets where each assistant turn starts (after its generation prompt, e.g.
    ``<|im_start|>assistant\\n``) and ends, found by rendering growing prefixes of the conversation; each piece is
    tokenised on its own. Inside an assistant turn, tokens after its last EOS (ChatML's newline after
    ``<|im_end|>``) are context, not targets, because generation stops at EOS.
    """
    full = render_chat(tokenizer, messages, add_generation_prompt=False, tools=tools, **template_kwargs)
    cuts: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_text = render_chat(tokenizer, messages[:i], True, tools=tools, **template_kwargs) if i else ""
        end_text = render_chat(tokenizer, messages[:i + 1], False, tools=tools, **template_kwargs)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise ValueError("the chat template does not render conversations prefix by prefix (an earlier turn "
                             f"changes when turn {i} is added), so assistant tokens cannot be located for the loss "
                             "mask; use a template that renders each turn independently.")
        cuts.append((len(start_text), len(end_text)))
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, end in cuts:
        context = encode(tokenizer, full[pos:start]) if start > pos else []
        target = encode(tokenizer, full[start:end]) if end > start else []
        target_mask = [1] * len(target)
        if eos is not None and eos in target:
            last = len(target) - 1 - target[::-1].index(eos)
            target_mask[last + 1:] = [0] * (len(target) - last - 1)
        ids += context + target
        mask += [0] * len(context) + target_mask
        pos = end
    tail = encode(tokenizer, full[pos:]) if pos < len(full) else []
    ids += tail
    mask += [0] * len(tail)
    return ids, mask
