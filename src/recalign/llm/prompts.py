"""Prompt rendering: templates held in config, a wrapper (chat template / Alpaca / plain), placeholder
slots, and the truncation policy (drop the oldest history items, never the target).

`Prompter` is the one renderer every LLM method uses; the fields come from the method's task samples
(`recalign.tasks.text.frame_fields`), so this layer never reads a dataset.

A template is a mapping with `instruction` and `input` strings using `str.format` fields (e.g. `{liked}`,
`{target}`, `{noun}`), rendered and then wrapped:
- "chat": the tokenizer's chat template, one user turn `instruction\\n\\ninput`, generation prompt added;
  `system` replaces the template's default system message (None keeps the default, "" = empty one);
- "alpaca": the Alpaca wrapper the papers use (`### Instruction:` / `### Input:` / `### Response:`);
- "plain": `instruction\\ninput\\n` (no wrapper);
- "auto": chat when the tokenizer has a chat template, else alpaca.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

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


class Prompter:
    """A template {instruction, input} (`str.format` fields) + a wrapper + the token budget.

    require / forbid: placeholder slots (e.g. "<UserID>") that must occur exactly once / must not occur.
    max_tokens: a longer prompt drops its oldest history items (0 = no limit); `count_tokens` measures."""

    def __init__(self, template: Mapping, tokenizer, wrapper: str = "auto", system: str | None = "",
                 max_tokens: int = 0, count_tokens: Callable[[str], int] | None = None, where: str = "prompt",
                 require: Sequence[str] = (), forbid: Sequence[str] = (), check_fields: Mapping | None = None):
        for key in ("instruction", "input"):
            if not isinstance(template.get(key), str):
                raise InputError(f"{where}.{key}: expected a string template")
        text = template["instruction"] + template["input"]
        for slot in require:
            if text.count(slot) != 1:
                raise InputError(f"{where}: the template must contain the placeholder {slot} exactly once "
                                 f"(found {text.count(slot)})")
        for slot in forbid:
            if slot in text:
                raise InputError(f"{where}: the text-only template must not contain the placeholder {slot}")
        self.template, self.where = template, where
        self.wrap = Wrapper(wrapper, system=system, tokenizer=tokenizer)
        self.max_tokens = int(max_tokens or 0)
        self.count_tokens = count_tokens or (lambda t: len(tokenizer(t)["input_ids"]))
        if check_fields is not None:  # fail early on unknown template fields
            self.render(check_fields)

    def render(self, fields: Mapping) -> str:
        return self.wrap(fill(self.template["instruction"], f"{self.where}.instruction", **fields),
                         fill(self.template["input"], f"{self.where}.input", **fields))

    def render_fitted(self, fields: Callable[[int], Mapping], n_history: int) -> str:
        """Render with the newest k history items for the largest k <= n_history within max_tokens; a budget
        that not even the history-less prompt fits is a config error, not a silent loss of every history."""
        prompt, k = fit_history(lambda k: self.render(fields(k)), n_history, self.count_tokens, self.max_tokens)
        if k == 0 < n_history and self.count_tokens(prompt) > self.max_tokens:
            raise InputError(f"{self.where}.max_tokens={self.max_tokens}: a prompt without any history item already "
                             f"has {self.count_tokens(prompt)} tokens, so no history would fit; raise max_tokens")
        return prompt

    def render_all(self, samples: Sequence[tuple[Callable[[int], Mapping], int]]) -> list[str]:
        return [self.render_fitted(fields, n) for fields, n in samples]


def check_template(section: Mapping, where: str, fields: Mapping, keys: Sequence[str] = ("instruction", "input"),
                   uses_one_of: Sequence[str] = ()) -> None:
    """A prompt section's wrapper and templates, checked against example fields (before anything runs).
    `uses_one_of`: fields of which the templates must use at least one (a Yes/No prompt without {target}
    asks the same question of every sample)."""
    if section.get("wrapper", "auto") not in WRAPPERS:
        raise InputError(f"{where}.wrapper: unknown wrapper {section['wrapper']!r}; use one of {', '.join(WRAPPERS)}")
    for key in keys:
        if not isinstance(section.get(key), str):
            raise InputError(f"{where}.{key}: expected a string template")
        fill(section[key], f"{where}.{key}", **fields)
    used = {name for key in keys for _, name, _, _ in string.Formatter().parse(section[key]) if name}
    if uses_one_of and not used & set(uses_one_of):
        wanted = " or ".join("{" + name + "}" for name in uses_one_of)
        raise InputError(f"{where}: neither {' nor '.join(f'{where}.{key}' for key in keys)} uses {wanted}, so every "
                         "sample would get the same prompt")
