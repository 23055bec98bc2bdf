"""Prompt rendering: templates held in config, a wrapper (chat template / Alpaca / plain), history lists,
and the truncation policy (drop the oldest history items, never the target).

A template is a mapping with `instruction` and `input` strings using `str.format` fields (e.g. `{liked}`,
`{target}`, `{noun}`), rendered and then wrapped:
- "chat": the tokenizer's chat template, one user turn `instruction\\n\\ninput`, generation prompt added;
  `system` replaces the template's default system message (None keeps the default, "" = empty one);
- "alpaca": the Alpaca wrapper the papers use (`### Instruction:` / `### Input:` / `### Response:`);
- "plain": `instruction\\ninput\\n` (no wrapper);
- "auto": chat when the tokenizer has a chat template, else alpaca.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from recalign.errors import InputError

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
WRAPPERS = ("auto", "chat", "alpaca", "plain")


@dataclass
class Wrapper:
    """Turns (instruction, input) into the final prompt text for one tokenizer."""

    kind: str = "auto"
    system: str | None = ""
    tokenizer: object = None

    def __post_init__(self):
        if self.kind not in WRAPPERS:
            raise InputError(f"prompt.wrapper: unknown wrapper {self.kind!r}; use one of {', '.join(WRAPPERS)}")
        if self.kind == "auto":
            has_chat = bool(getattr(self.tokenizer, "chat_template", None))
            self.kind = "chat" if has_chat else "alpaca"
        if self.kind == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise InputError("prompt.wrapper: 'chat' requested but the tokenizer has no chat template")

    def __call__(self, instruction: str, input: str = "") -> str:
        if self.kind == "alpaca":
            return (ALPACA if input else ALPACA_NO_INPUT).format(instruction=instruction, input=input)
        if self.kind == "plain":
            return f"{instruction}\n{input}\n" if input else f"{instruction}\n"
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def quote_titles(titles: Sequence[str], quote: str = '"', sep: str = ", ") -> str:
    return sep.join(f"{quote}{t}{quote}" for t in titles)


def fill(template: str, where: str, **fields) -> str:
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise InputError(f"{where}: unknown field {{{exc.args[0]}}} in template; available: "
                         f"{', '.join('{' + k + '}' for k in fields)}") from None
    except (IndexError, ValueError) as exc:
        raise InputError(f"{where}: malformed template ({exc})") from None


def fit_history(render: Callable[[int], str], n_history: int, count_tokens: Callable[[str], int],
                max_tokens: int | None) -> tuple[str, int]:
    """Render with the newest `k` history items for the largest k <= n_history that fits `max_tokens`.

    `render(k)` must build the prompt from the k most recent items (the target always included).
    Returns (prompt, k). If even k = 0 is too long the k = 0 prompt is returned (the target is never cut)."""
    prompt = render(n_history)
    if not max_tokens or count_tokens(prompt) <= max_tokens:
        return prompt, n_history
    lo, hi = 0, n_history - 1  # binary search for the largest k that fits
    best = (render(0), 0)
    while lo <= hi:
        mid = (lo + hi) // 2
        text = render(mid)
        if count_tokens(text) <= max_tokens:
            best = (text, mid)
            lo = mid + 1
        else:
            hi = mid - 1
    return best
