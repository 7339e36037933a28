"""AttentionPO's judge text: the question put to pi_ref about two continuations, with each one's exact place.

Two forms, one layout. A base model without a chat template (GPT-2, the tiny profile) reads the plain text
:data:`JUDGE_TEMPLATE`, whose last token is the query. A chat model (SmolLM2-135M-Instruct, the smol profile)
is asked as the paper intends: :data:`CHAT_JUDGE_TEMPLATE` becomes the user message of its own chat template,
rendered with the generation prompt (``add_generation_prompt=True``), and the query is the last token of that
prompt, where the assistant's verdict would start. :func:`judge_prompt` picks the form from the tokenizer.

Either way the character span of each response is known exactly, so that
:mod:`tdpo_lab.methods.attnpo_judge` can find its tokens through the offset mapping and check that they equal
the response's own tokenisation. Derived in notebooks/07_attention_po.ipynb.
"""

from __future__ import annotations

from tdpo_lab.methods._common import abbrev

__all__ = [
    "CHAT_JUDGE_TEMPLATE",
    "JUDGE_TEMPLATE",
    "chat_judge_text",
    "judge_prompt",
    "judge_text",
    "uses_chat_template",
]

_LAYOUT = (
    "Here is the opening of a movie review, followed by two possible continuations of it, A and B.\n"
    "Review opening:{prompt}\n"
    "Continuation A:{answer_a}\n"
    "Continuation B:{answer_b}\n"
    "Which continuation is more positive and fluent, A or B?"
)
# The AttentionPO judge prompt, adapted to a base language model without a chat template (GPT-2). The
# official prompt (HCY123902/AttentionPO) is an instruction for chat models with tagged answer blocks; this
# is a plain-text adaptation, not a replication. Each slot is filled by :func:`judge_text`, which places a
# text starting with whitespace right after the colon and any other text on the next line, so that every
# response is tokenised in the judge text exactly as on its own (byte-level BPE never merges across the
# colon/whitespace or newline/non-whitespace boundary this creates). The query is the last token ("Answer:").
JUDGE_TEMPLATE = _LAYOUT + " Answer:"
# The user message for a chat model (its chat template adds the roles and the assistant's turn): the same
# layout, so responses are placed as in the plain text, and an instruction to answer with one letter.
CHAT_JUDGE_TEMPLATE = _LAYOUT + " Answer with one letter, A or B."

_SLOTS = ("{prompt}", "{answer_a}", "{answer_b}")
_ASCII_SPACE = " \t\n\r\x0b\x0c"
_MARK = "\x00judge message\x00"  # stands for the user message when the chat frame is rendered alone


def _slot(text: str) -> str:
    # Text starting with whitespace goes right after the colon (":" never merges with whitespace); anything
    # else goes on its own line ("\n" merges only with whitespace). Either way the text's first BPE
    # pre-token starts exactly where the text starts, as when it is tokenised alone.
    return text if text[:1] and text[0] in _ASCII_SPACE else "\n" + text


def judge_text(
    prompt: str, answer_a: str, answer_b: str, *, template: str = JUDGE_TEMPLATE
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Fill the judge template; return the text and the character spans ``[start, end)`` of both answers.

    The template needs ``{prompt}``, ``{answer_a}`` and ``{answer_b}`` once each, in this order; no other
    braces are interpreted (answers may contain braces). See :data:`JUDGE_TEMPLATE` for how slots are filled.
    """
    where = [template.find(slot) for slot in _SLOTS]
    if any(i < 0 for i in where) or any(template.count(s) != 1 for s in _SLOTS) or where != sorted(where):
        raise ValueError(
            "the judge template must contain {prompt}, {answer_a} and {answer_b} exactly once each, in this "
            f"order; got {abbrev(template, 120)}."
        )
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    length = 0
    for slot, pos, value in zip(_SLOTS, where, (prompt, answer_a, answer_b), strict=True):
        literal = template[cursor:pos]
        filled = _slot(value) if value else ""
        pieces += [literal, filled]
        length += len(literal)
        start = length + len(filled) - len(value)
        length += len(filled)
        spans.append((start, length))
        cursor = pos + len(slot)
    pieces.append(template[cursor:])
    return "".join(pieces), spans[1], spans[2]


def uses_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (then the judge is asked through it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, content: str) -> str:
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def chat_judge_text(
    tokenizer, prompt: str, answer_a: str, answer_b: str, *, template: str = CHAT_JUDGE_TEMPLATE
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """The judge question as the user turn of the tokenizer's chat template, with the generation prompt.

    The user message is ``judge_text(prompt, answer_a, answer_b, template=template)``; the answers' character
    spans are shifted by where the template puts the message (found by rendering the frame around a marker).
    The text ends with the assistant's turn opening (``add_generation_prompt=True``), whose last token is the
    query. Tokenise it with ``add_special_tokens=False``: the template writes the special tokens itself.
    """
    content, span_a, span_b = judge_text(prompt, answer_a, answer_b, template=template)
    frame = _render(tokenizer, _MARK)
    if frame.count(_MARK) != 1:
        raise ValueError(
            "the tokenizer's chat template does not place the user message once, verbatim; the judge cannot "
            "locate the responses in it (pass chat=False for the plain-text judge)."
        )
    before, after = frame.split(_MARK)
    text = _render(tokenizer, content)
    if text != before + content + after:
        raise ValueError(
            "the tokenizer's chat template changes the user message (trims or escapes it), so the responses' "
            "characters cannot be located in the judge text; pass chat=False for the plain-text judge."
        )
    shift = len(before)
    return text, (span_a[0] + shift, span_a[1] + shift), (span_b[0] + shift, span_b[1] + shift)


def judge_prompt(
    tokenizer,
    prompt: str,
    answer_a: str,
    answer_b: str,
    *,
    template: str | None = None,
    chat: bool | None = None,
) -> tuple[str, tuple[int, int], tuple[int, int], bool]:
    """The judge text in the form the tokenizer calls for: ``(text, span_a, span_b, add_special_tokens)``.

    ``chat=None`` asks through the chat template when the tokenizer has one (:func:`chat_judge_text`, default
    template :data:`CHAT_JUDGE_TEMPLATE`), else writes plain text (:func:`judge_text`, :data:`JUDGE_TEMPLATE`);
    ``True``/``False`` force the form. ``add_special_tokens`` is how to tokenise the text (False for the chat
    form, whose template writes its own special tokens).
    """
    if chat is None:
        chat = uses_chat_template(tokenizer)
    if chat:
        if not uses_chat_template(tokenizer):
            raise ValueError("chat=True, but the tokenizer has no chat template; use chat=None or False.")
        text, span_a, span_b = chat_judge_text(
            tokenizer, prompt, answer_a, answer_b, template=template or CHAT_JUDGE_TEMPLATE
        )
        return text, span_a, span_b, False
    text, span_a, span_b = judge_text(prompt, answer_a, answer_b, template=template or JUDGE_TEMPLATE)
    return text, span_a, span_b, True
