"""The chat template: messages -> (ids, loss_mask), one renderer for training and for inference.

    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|><|user|>…<|end|><|assistant|>

Each message is its role token, its content and <|end|>; a generation prompt ends with
<|assistant|>, and the model answers up to its own <|end|>. The loss mask is 1 exactly on the
tokens the model must learn to produce: every assistant content token and that turn's <|end|>.

Contents are encoded with special-token strings treated as plain text, so a user who types
"<|end|>" cannot forge a turn boundary. `CHAT_TEMPLATE` is the same format in the Jinja form
that `transformers`' `apply_chat_template` renders (saved in tokenizer_config.json); it gives the
same ids for any content that does not spell a special token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from zerolm.tokenizer.specials import ASSISTANT, BOS, END, SYSTEM, USER

if TYPE_CHECKING:  # tokenizer.py imports CHAT_TEMPLATE from here
    from zerolm.tokenizer.tokenizer import Tokenizer

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_messages(messages: Sequence[dict], where: str = "conversation") -> None:
    """ValueError naming the problem unless messages is a list of {role, content} dicts with
    known roles, string contents, and a system message only first."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(
                f"{where}: message {i} must be an object with 'role' and 'content', got {m!r:.80}"
            )
        if m["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise ValueError(
                f"{where}: message {i} content must be a string, got {type(m['content']).__name__}"
            )
        if m["role"] == "system" and i > 0:
            raise ValueError(f"{where}: a system message may only come first (message {i})")


def render(
    tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[int], list[int]]:
    """(ids, loss_mask, ends): token ids, 1 on the tokens the model learns to produce (assistant
    content and its end of turn), and the length of the rendering after each message (so a caller
    can cut a conversation at a turn boundary; -1 where a foreign template's prefix is not one).
    A foreign tokenizer renders with its model's own template (tokenizer/template.py)."""
    check_messages(messages)
    if tok.template is not None:
        return tok.template.render(messages, add_generation_prompt)
    if tok.layout != "zerolm":
        raise ValueError(
            'this tokenizer has no chat template: add a chat_template.jinja (or "chat_template" in '
            "tokenizer_config.json) to the model directory, or fine-tune a chat model first"
        )
    end = tok.token_id(END)
    ids, mask, ends = [tok.token_id(BOS)], [0], []
    contents = tok.encode_batch([m["content"] for m in messages], split_special=False)
    for m, content in zip(messages, contents):
        learn = int(m["role"] == "assistant")
        ids += [tok.token_id(ROLES[m["role"]]), *content, end]
        mask += [0] + [learn] * (len(content) + 1)
        ends.append(len(ids))
    if add_generation_prompt:
        ids.append(tok.token_id(ASSISTANT))
        mask.append(0)
    return ids, mask, ends


def conversation_ids(
    tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
) -> list[int]:
    """The ids of `render` without its loss mask: for scoring or prompting a conversation. A
    foreign template's turns need not be prefix-stable here (Qwen3, DeepSeek-R1 rewrite earlier
    turns: no mask can be found for them, but their ids can)."""
    if tok.template is not None:
        check_messages(messages)
        return tok.template.ids(messages, add_generation_prompt)
    return render(tok, messages, add_generation_prompt)[0]


def prompt_ids(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids that ask the model for the next assistant turn."""
    return conversation_ids(tok, messages, add_generation_prompt=True)
