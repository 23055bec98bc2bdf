"""Hybrid prompts: text plus soft tokens injected at placeholder slots (CoLLM's CIE outputs, Soft-Prompt's
learned vectors), and CoLLM's CTR protocol.

- `protocol`: samples (every interaction, last-L liked history), temporal split on the time axis, warm/cold
  marks, bounded valid/test draws, AUC/UAUC on all/warm/cold.
- `modules`: `CIE` (Linear(d, 10d) → ReLU → Linear(10d, hidden·k)) and `SoftPrompt`.
- `recipe`: prompt rendering with slots, the text-only LoRA step, training slot modules with the LLM frozen,
  cached evaluation.

Candidates to move down later: `protocol` into data/ + eval/ (next to llm/ctr.py's TALLRec protocol),
`modules` and `recipe.train_slot_modules` into llm/.
"""
