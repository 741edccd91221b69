"""Which prompt tokens the text encoders never see: diffusers cuts long prompts silently.

Counted as diffusers 0.42 cuts them:
- FLUX (`FluxPipeline._get_clip_prompt_embeds`, `_get_t5_prompt_embeds`): `tokenizer` (CLIP) with its special
  tokens, truncated to `pipe.tokenizer_max_length` (the tokenizer's model_max_length, 77); `tokenizer_2` (T5)
  with its end token, truncated to `max_sequence_length`.
- Qwen-Image (`QwenImagePipeline._get_qwen_prompt_embeds`, `encode_prompt`): the prompt wrapped in
  `pipe.prompt_template_encode` is tokenized and truncated to `tokenizer_max_length + start_idx` tokens, the
  first `prompt_template_encode_start_idx` (the system part of the template) are dropped, and the rest is cut
  to `max_sequence_length`. The count is of that rest: the prompt plus the template's closing tokens
  (`<|im_end|>`, `<|im_start|>assistant`), which go first when the prompt fills the limit.

What each family encodes is its module's `encoders` (pipeline/families/); nothing here knows about families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional


@dataclass(frozen=True)
class Encoder:
    key: str  # the name in dropped_tokens() and the sidecar's prompt_truncated
    label: str  # in messages: "112 CLIP tokens"
    tokenizer: str  # the pipeline attribute holding its tokenizer
    limit: Callable[[Any, int], int]  # (pipe, max_sequence_length) -> tokens the pipeline keeps
    templated: bool = False  # the prompt goes through pipe.prompt_template_encode, whose head is dropped
    hint: str = ""  # how to keep the whole prompt


def clip_limit(pipe, max_sequence_length: int) -> int:
    """CLIP's fixed window (the pipeline's tokenizer_max_length, 77)."""
    return getattr(pipe, "tokenizer_max_length", None) or 77


def sequence_limit(pipe, max_sequence_length: int) -> int:
    """An encoder cut to the run's max_sequence_length (T5, Qwen3)."""
    return max_sequence_length


def templated_limit(pipe, max_sequence_length: int) -> int:
    """A chat-templated encoder: the pipeline's own cap, then max_sequence_length."""
    return min(getattr(pipe, "tokenizer_max_length", 1024), max_sequence_length)


def encoders_of(family: str) -> tuple[Encoder, ...]:
    """The text encoders a family's pipeline feeds (its module's `encoders`)."""
    from pipeline.families import family as get_family

    return get_family(family).encoders


@dataclass(frozen=True)
class PromptCut:
    """One encoder's view of one prompt: `tokens` as the pipeline counts them, `limit` it keeps."""

    encoder: str
    label: str
    tokens: int
    limit: int
    hint: str = ""

    @property
    def dropped(self) -> int:
        return max(0, self.tokens - self.limit)


def _count(pipe, enc: Encoder, prompt: str) -> Optional[int]:
    tokenizer = getattr(pipe, enc.tokenizer, None)
    if tokenizer is None:
        return None
    if not enc.templated:  # the pipeline's own call: special tokens added, as it adds them
        return len(tokenizer(prompt, verbose=False).input_ids)
    ids = tokenizer(pipe.prompt_template_encode.format(prompt), verbose=False).input_ids
    return len(ids) - pipe.prompt_template_encode_start_idx


def token_counts(pipe, family: str, prompt: str, max_sequence_length: int) -> list[PromptCut]:
    """Each encoder of `family` (that the pipeline has) with the prompt's tokens and its limit, cut or not."""
    counts = []
    for enc in encoders_of(family):
        tokens = _count(pipe, enc, prompt)
        if tokens is not None:
            counts.append(PromptCut(enc.key, enc.label, tokens, enc.limit(pipe, max_sequence_length), enc.hint))
    return counts


def prompt_cuts(pipe, family: str, prompt: str, max_sequence_length: int) -> list[PromptCut]:
    """The encoders that lose tokens of `prompt` (empty: every encoder reads the whole prompt)."""
    return [c for c in token_counts(pipe, family, prompt, max_sequence_length) if c.dropped]


def dropped_tokens(pipe, family: str, prompt: str, max_sequence_length: int) -> dict[str, int]:
    """{encoder: tokens cut} for the encoders that cut `prompt` (only non-zero entries)."""
    return {c.encoder: c.dropped for c in prompt_cuts(pipe, family, prompt, max_sequence_length)}


def truncation_warning(index: int, line: int, cuts: Iterable[PromptCut], row_id: Optional[str] = None) -> str:
    """`row 12 (line 13): prompt is 112 CLIP tokens; the last 35 are dropped (limit 77). <how to keep them>`"""
    cuts = list(cuts)
    where = f"row {index} (line {line}{f', id {row_id}' if row_id else ''})"
    parts = "; ".join(f"prompt is {c.tokens} {c.label} tokens; the last {c.dropped} are dropped (limit {c.limit})"
                      for c in cuts)
    hints = "; ".join(dict.fromkeys(c.hint for c in cuts if c.hint))
    return f"{where}: {parts}" + (f". {hints[0].upper()}{hints[1:]}" if hints else "")


def truncated_rows(pipe, family: str, tasks: Iterable, warn: Optional[Callable[[str], None]] = None
                   ) -> dict[str, dict[str, int]]:
    """Check each row of `tasks` (ImageTasks) once: {row id: {encoder: tokens cut}} for rows that lose tokens,
    with one `warn` (default: the pipeline logger's warning) per such row."""
    if warn is None:
        import logging

        warn = logging.getLogger("pipeline").warning
    found: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, int]] = set()
    for t in tasks:
        if (t.row.id, t.max_sequence_length) in seen:
            continue
        seen.add((t.row.id, t.max_sequence_length))
        cuts = prompt_cuts(pipe, family, t.prompt, t.max_sequence_length)
        if cuts:
            found[t.row.id] = {c.encoder: c.dropped for c in cuts}
            warn(truncation_warning(t.row.index, t.row.line, cuts, t.row.id))
    return found
