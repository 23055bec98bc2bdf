"""`Backbone`: one causal LM + tokenizer (+ optional LoRA) with what every LLM method needs.

Batching, left padding, position ids, dtype and device are handled here once. Every entry point takes
plain prompt strings (already rendered, see `llm.prompts`); placeholders such as "<UserID>" inside a prompt
can be filled with arbitrary embeddings through `slots` (a mapping placeholder -> tensor [B, k, hidden] or
[B, hidden]); the placeholder text itself never reaches the tokenizer, each occurrence becomes k positions
whose input embeddings are replaced.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from recalign import distributed
from recalign.errors import InputError

Slots = Mapping[str, torch.Tensor]


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Sequence[str] = ("q_proj", "v_proj")

    @classmethod
    def from_config(cls, section: Mapping) -> "LoraSettings":
        return cls(r=int(section.get("r", 8)), alpha=int(section.get("alpha", 16)),
                   dropout=float(section.get("dropout", 0.05)),
                   target_modules=tuple(section.get("target_modules", ("q_proj", "v_proj"))))


@dataclass
class Encoded:
    """A left-padded batch. Row i's answer (if any) occupies its last `answer_lengths[i]` positions."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    answer_lengths: torch.Tensor  # [B]
    slot_positions: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, k]


@dataclass
class Generation:
    """texts[i][j] / token_ids[i][j]: the j-th returned sequence for prompt i (best first);
    scores[i, j]: its mean log-probability per generated token (HF beam score with length_penalty=1)."""

    texts: list[list[str]]
    scores: torch.Tensor
    token_ids: list[list[list[int]]]


class Backbone:
    def __init__(self, model, tokenizer, name: str = "", batch_size: int = 8, prefix_cache: bool | None = None,
                 min_prefix_tokens: int = 16, quantize: str | None = "none", precision: Mapping | None = None):
        from recalign.llm.precision import dtype_name, parse_quantize

        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.name = name
        self.batch_size = batch_size
        self.prefix_cache = self.device.type == "cpu" if prefix_cache is None else prefix_cache
        self.min_prefix_tokens = min_prefix_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._token_cache: dict[str, list[int]] = {}
        forward = inspect.signature(type(self.causal_lm).forward).parameters
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self.quantize = parse_quantize(quantize)
        if self.quantize == "int8" and self.device.type != "cpu":
            raise InputError(f"model.quantize: int8 (dynamic quantisation) runs on the CPU only, not on {self.device}")
        self._quantized = False
        self._precision = dict(precision) if precision else {
            "dtype": dtype_name(self.dtype), "reason": "the model as given", "quantize": self.quantize}

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, source: str = "smollm2-135m-instruct", dtype: str = "auto", device: str = "auto",
             quantize: str | None = "none", **kwargs) -> "Backbone":
        """`dtype` auto is decided per machine (`llm.precision.decide`); the choice and its reason are in
        `backbone.precision` and logged."""
        from recalign.llm.loading import load_model, pick_device
        from recalign.llm.precision import decide, dtype_name
        from recalign.progress import log

        dev = pick_device(device)
        precision = decide(dtype, dev, quantize, source)
        model, tokenizer = load_model(source, dtype=dtype_name(precision.dtype), device=str(dev))
        backbone = cls(model, tokenizer, name=source, quantize=precision.quantize, precision=precision.as_dict(),
                       **kwargs)
        quant = ", int8 linear layers" if precision.quantize == "int8" else ""
        log(f"model {source}: {dtype_name(precision.dtype)}{quant} on {dev} ({precision.reason})")
        return backbone

    @classmethod
    def from_config(cls, section: Mapping) -> "Backbone":
        """From a `model:` config section (name, dtype, quantize, device, batch_size, prefix_cache)."""
        return cls.load(section.get("name", "smollm2-135m-instruct"), dtype=section.get("dtype", "auto"),
                        device=section.get("device", "auto"), quantize=section.get("quantize", "none"),
                        batch_size=int(section.get("batch_size", 8)), prefix_cache=section.get("prefix_cache"))

    @property
    def precision(self) -> dict:
        """{"dtype", "reason", "quantize"}: the number format the model runs in and why (for metrics.json)."""
        return dict(self._precision)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def causal_lm(self):
        """The transformers model (under the peft wrapper when there is one)."""
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (an int8-quantised model keeps float32 activations and embeddings)."""
        return self.causal_lm.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.causal_lm.config.hidden_size)

    def input_embeddings(self) -> torch.nn.Module:
        return self.causal_lm.get_input_embeddings()

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a whole prompt (the tokenizer's special tokens added, a doubled BOS dropped)."""
        ids = self._token_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            bos = self.tokenizer.bos_token_id
            if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
                ids = ids[1:]
            if len(self._token_cache) < 200_000:
                self._token_cache[text] = ids
        return list(ids)

    def tokenize_piece(self, text: str) -> list[int]:
        """Token ids of a continuation (an answer, a text between placeholders): no special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def answer_token_id(self, answer: str) -> int:
        """The id of the first token of `answer` as it is appended after a prompt (e.g. "Yes" vs " Yes")."""
        ids = self.tokenize_piece(answer)
        if not ids:
            raise InputError(f"answer text {answer!r} tokenizes to nothing")
        return ids[0]

    def yes_no_ids(self, yes: str = "Yes", no: str = "No") -> tuple[int, int]:
        y, n = self.answer_token_id(yes), self.answer_token_id(no)
        if y == n:
            raise InputError(f"answers {yes!r} and {no!r} start with the same token ({y}); they cannot be scored")
        return y, n

    def _prompt_ids(self, prompt: str, slot_k: Mapping[str, int] | None) -> tuple[list[int], dict[str, list[int]]]:
        if not slot_k:
            return self.tokenize(prompt), {}
        names = sorted(slot_k, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(n) for n in names))
        ids: list[int] = []
        positions: dict[str, list[int]] = {n: [] for n in slot_k}
        cursor = 0
        for match in pattern.finditer(prompt):
            piece = prompt[cursor:match.start()]
            ids += self.tokenize(piece) if cursor == 0 else self.tokenize_piece(piece)
            name = match.group(0)
            if positions[name]:
                raise InputError(f"placeholder {name} occurs more than once in a prompt: {prompt[:80]!r}...")
            positions[name] = list(range(len(ids), len(ids) + slot_k[name]))
            ids += [self.pad_id] * slot_k[name]
            cursor = match.end()
        tail = prompt[cursor:]
        ids += self.tokenize(tail) if cursor == 0 else self.tokenize_piece(tail)
        missing = [n for n, p in positions.items() if not p]
        if missing:
            raise InputError(f"placeholder(s) {', '.join(missing)} missing from prompt {prompt[:80]!r}...")
        return ids, positions

    def encode(self, prompts: Sequence[str], answers: Sequence[str] | None = None,
               slot_k: Mapping[str, int] | None = None) -> Encoded:
        """Tokenize prompts (+ answers appended token-wise) into a left-padded batch on the device."""
        rows, answer_lengths, slot_rows = [], [], []
        for i, prompt in enumerate(prompts):
            ids, positions = self._prompt_ids(prompt, slot_k)
            answer = self.tokenize_piece(answers[i]) if answers is not None else []
            rows.append(ids + answer)
            answer_lengths.append(len(answer))
            slot_rows.append(positions)
        return self._pad(rows, answer_lengths, slot_rows, slot_k)

    def _pad(self, rows, answer_lengths, slot_rows, slot_k) -> Encoded:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        slots = {}
        for name in slot_k or {}:
            slots[name] = torch.tensor([[width - len(rows[i]) + p for p in slot_rows[i][name]]
                                        for i in range(len(rows))], dtype=torch.long, device=self.device)
        dev = self.device
        return Encoded(ids.to(dev), mask.to(dev), positions.to(dev), torch.tensor(answer_lengths), slots)

    # ------------------------------------------------------------------ forward passes
    def _inputs(self, enc: Encoded, slots: Slots | None) -> dict:
        if not slots:
            return {"input_ids": enc.input_ids}
        embeds = self.input_embeddings()(enc.input_ids)
        for name, values in slots.items():
            values = values.to(device=embeds.device, dtype=embeds.dtype)
            if values.dim() == 2:
                values = values.unsqueeze(1)
            pos = enc.slot_positions[name]  # [B, k]
            if values.shape[:2] != pos.shape:
                raise InputError(f"slot {name}: embeddings of shape {tuple(values.shape)} do not match "
                                 f"{tuple(pos.shape)} placeholder positions")
            rows = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)
            embeds = embeds.index_put((rows.reshape(-1), pos.reshape(-1)), values.reshape(-1, values.shape[-1]))
        return {"inputs_embeds": embeds}

    def logits(self, enc: Encoded, slots: Slots | None = None, keep: int = 1) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` positions (keep=0: all). Differentiable."""
        self._ensure_quantized()
        out = self.model(**self._inputs(enc, slots), attention_mask=enc.attention_mask,
                         position_ids=enc.position_ids, logits_to_keep=keep, use_cache=False)
        return out.logits

    def _slot_k(self, slots: Slots | None) -> dict[str, int] | None:
        if not slots:
            return None
        return {name: (1 if v.dim() == 2 else int(v.shape[1])) for name, v in slots.items()}

    def forward_with_injection(self, prompts: Sequence[str], slots: Slots) -> torch.Tensor:
        """Next-token logits [B, V] after each prompt, with placeholder embeddings replaced by `slots`."""
        return self.logits(self.encode(prompts, slot_k=self._slot_k(slots)), slots)[:, -1]

    def yes_no_logits(self, prompts: Sequence[str], slots: Slots | None = None, yes: str = "Yes",
                      no: str = "No") -> torch.Tensor:
        """logit(yes) - logit(no) at the first answer position, [B], differentiable (one batch)."""
        y, n = self.yes_no_ids(yes, no)
        last = self.logits(self.encode(prompts, slot_k=self._slot_k(slots)), slots)[:, -1].float()
        return last[:, y] - last[:, n]

    def yes_no_bce(self, prompts: Sequence[str], labels: torch.Tensor, slots: Slots | None = None,
                   yes: str = "Yes", no: str = "No") -> torch.Tensor:
        """Binary cross-entropy of the Yes/No score (CoLLM's loss)."""
        score = self.yes_no_logits(prompts, slots, yes, no)
        return F.binary_cross_entropy_with_logits(score, labels.to(score.device, torch.float32))

    def lm_loss(self, prompts: Sequence[str], answers: Sequence[str], slots: Slots | None = None,
                answer_only: bool = True, prefix_cache: bool | None = None) -> tuple[torch.Tensor, int]:
        """Mean causal-LM cross-entropy over the answer tokens (or over every real token), and the token count.

        Only the logits that the loss needs are computed (the last max-answer-length + 1 positions). With
        answer-only loss and no slots, the token prefix shared by the batch is run once (batch of one) and its
        KV cache expanded to the batch (`prefix_cache`, default: the backbone's setting); gradients flow
        through it, so the loss and gradients are those of the plain batch."""
        slot_k = self._slot_k(slots)
        use_prefix = (self.prefix_cache if prefix_cache is None else prefix_cache) and answer_only and not slots
        if use_prefix:
            prompt_ids = [self.tokenize(p) for p in prompts]
            prefix = self._shared_prefix(prompt_ids)
            if prefix is not None:
                answer_ids = [self.tokenize_piece(a) for a in answers]
                enc, logits = self._logits_after_prefix(prefix, [p + a for p, a in zip(prompt_ids, answer_ids)],
                                                        [len(a) for a in answer_ids],
                                                        keep=max(len(a) for a in answer_ids) + 1)
                return self._ce(logits, self._answer_labels(enc))
        enc = self.encode(prompts, answers, slot_k=slot_k)
        if answer_only:
            labels = self._answer_labels(enc)
            keep = int(enc.answer_lengths.max()) + 1
        else:
            # pads and each row's first real token (nothing predicts it) are never targets
            labels = enc.input_ids.masked_fill((enc.attention_mask == 0) | (enc.position_ids == 0), -100)
            keep = 0
        logits = self.logits(enc, slots, keep=keep if keep < labels.shape[1] else 0)
        return self._ce(logits, labels)

    @staticmethod
    def _answer_labels(enc: Encoded) -> torch.Tensor:
        width = enc.input_ids.shape[1]
        lengths = enc.answer_lengths.to(enc.input_ids.device)
        is_answer = torch.arange(width, device=lengths.device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
        return enc.input_ids.masked_fill(~is_answer | (enc.attention_mask == 0), -100)

    @staticmethod
    def _ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Shifted cross-entropy of logits for the last positions of `labels` (mean over target tokens)."""
        targets = labels[:, -logits.shape[1] + 1:] if logits.shape[1] > 1 else labels[:, :0]
        n_tokens = int((targets != -100).sum())
        if n_tokens == 0:
            raise InputError("lm_loss: no tokens to train on (empty answers?)")
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum") / n_tokens
        return loss, n_tokens

    # ------------------------------------------------------------------ batched inference
    @contextmanager
    def evaluating(self) -> Iterator[None]:
        self._ensure_quantized()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _batches(self, lengths: Sequence[int], batch_size: int | None) -> list[list[int]]:
        """Indices sorted by length (little padding), cut into batches."""
        size = batch_size or self.batch_size
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[s:s + size] for s in range(0, len(order), size)]

    def score_yes_no(self, prompts: Sequence[str], yes: str = "Yes", no: str = "No", slots: Slots | None = None,
                     batch_size: int | None = None, prefix_cache: bool | None = None,
                     progress: str | None = None) -> torch.Tensor:
        """logit(yes) - logit(no) for each prompt, float32 on the CPU, in input order.

        One forward pass per batch (no generate), left padding, logits only at the last position. Without
        slots, the token prefix shared by all prompts (instruction, system prompt) is run once and its KV
        cache reused for every batch (`prefix_cache`)."""
        if not prompts:
            return torch.zeros(0)
        y, n = self.yes_no_ids(yes, no)
        slot_k = self._slot_k(slots)
        ids, positions = zip(*(self._prompt_ids(p, slot_k) for p in prompts))
        use_prefix = (self.prefix_cache if prefix_cache is None else prefix_cache) and not slots
        out = torch.zeros(len(prompts), dtype=torch.float32)
        processes = distributed.current()  # several processes: each scores whole batches, the rows are added up
        batches = processes.share(self._batches([len(r) for r in ids], batch_size))
        if progress:
            from recalign.progress import track

            batches = track(batches, progress)
        with self.evaluating():
            prefix = self._shared_prefix(ids) if use_prefix else None
            for batch in batches:
                if prefix is not None:
                    last = self._logits_after_prefix(prefix, [ids[i] for i in batch], [0] * len(batch))[1][:, -1]
                else:
                    enc = self._pad([ids[i] for i in batch], [0] * len(batch), [positions[i] for i in batch], slot_k)
                    sub = {k: v[batch] for k, v in slots.items()} if slots else None
                    last = self.logits(enc, sub)[:, -1]
                last = last.float()
                out[torch.tensor(batch)] = (last[:, y] - last[:, n]).cpu()
        return processes.sum(out)

    def scoring_tokens(self, prompts: Sequence[str], prefix_cache: bool | None = None,
                       batch_size: int | None = None) -> tuple[int, int]:
        """(shared prefix length, token positions run) of `score_yes_no(prompts)` without slots: the prefix once
        when it is cached, then every batch at its padded width. For FLOP accounting (benchmarks)."""
        ids = [self.tokenize(p) for p in prompts]
        use = self.prefix_cache if prefix_cache is None else prefix_cache
        length = _common_prefix_length(ids) if use else 0
        length = length if length >= self.min_prefix_tokens else 0
        tokens = length + sum(len(batch) * max(len(ids[i]) - length for i in batch)
                              for batch in self._batches([len(r) for r in ids], batch_size))
        return length, tokens

    def _shared_prefix(self, rows: Sequence[Sequence[int]]) -> "_Prefix | None":
        """The token prefix every row shares, run once (batch of one) for its KV cache; None when it is shorter
        than `min_prefix_tokens`. Differentiable when grad is enabled (`lm_loss` trains through it)."""
        length = _common_prefix_length(rows)
        if length < self.min_prefix_tokens:
            return None
        self._ensure_quantized()
        ids = torch.tensor([list(rows[0][:length])], device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return _Prefix(length, getattr(out, "cache", None) or out.past_key_values)

    def _logits_after_prefix(self, prefix: "_Prefix", rows: Sequence[Sequence[int]], answer_lengths: Sequence[int],
                             keep: int = 1) -> tuple[Encoded, torch.Tensor]:
        """(left-padded batch of the rows' suffixes, logits [B, keep, V] of its last `keep` positions) for token
        rows that all start with the cached prefix; row i ends with an answer of `answer_lengths[i]` tokens."""
        enc = self._pad([list(r[prefix.length:]) for r in rows], list(answer_lengths), [{}] * len(rows), None)
        batch = enc.input_ids.shape[0]
        mask = torch.cat([torch.ones(batch, prefix.length, dtype=enc.attention_mask.dtype, device=self.device),
                          enc.attention_mask], dim=1)
        out = self.model(input_ids=enc.input_ids, attention_mask=mask,
                         position_ids=enc.position_ids + prefix.length, use_cache=True, logits_to_keep=keep,
                         **{self._cache_kw: _expand_cache(prefix.cache, batch)})
        return enc, out.logits

    def generate(self, prompts: Sequence[str], num_beams: int = 1, logits_processor=None, max_new_tokens: int = 32,
                 num_return_sequences: int | None = None, slots: Slots | None = None,
                 batch_size: int | None = None, **generate_kwargs) -> Generation:
        """Greedy (num_beams=1) or beam search; all `num_return_sequences` (default num_beams) beams returned.

        `logits_processor`: a transformers LogitsProcessor or a list of them (e.g. a constraint)."""
        from transformers import LogitsProcessorList

        returns = num_return_sequences or num_beams
        if returns > num_beams:
            raise InputError(f"num_return_sequences ({returns}) cannot exceed num_beams ({num_beams})")
        processors = None
        if logits_processor is not None:
            items = logits_processor if isinstance(logits_processor, (list, tuple)) else [logits_processor]
            processors = LogitsProcessorList(items)
        slot_k = self._slot_k(slots)
        ids, positions = zip(*(self._prompt_ids(p, slot_k) for p in prompts))
        texts: list = [None] * len(prompts)
        token_ids: list = [None] * len(prompts)
        scores = torch.zeros(len(prompts), returns)
        eos = self.tokenizer.eos_token_id
        with self.evaluating():
            for batch in self._batches([len(r) for r in ids], batch_size):
                enc = self._pad([ids[i] for i in batch], [0] * len(batch), [positions[i] for i in batch], slot_k)
                sub = {k: v[batch] for k, v in slots.items()} if slots else None
                inputs = self._inputs(enc, sub)
                out = self.model.generate(
                    **inputs, attention_mask=enc.attention_mask, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, num_return_sequences=returns, do_sample=False,
                    logits_processor=processors, output_scores=True, return_dict_in_generate=True,
                    pad_token_id=self.pad_id, eos_token_id=eos, **generate_kwargs)
                sequences = out.sequences
                if "input_ids" in inputs:
                    sequences = sequences[:, enc.input_ids.shape[1]:]
                if num_beams > 1:
                    seq_scores = out.sequences_scores.float().cpu()
                else:
                    seq_scores = _greedy_scores(self.model, out, sequences, eos)
                for j, i in enumerate(batch):
                    rows = [_strip(sequences[j * returns + r].tolist(), eos, self.pad_id) for r in range(returns)]
                    token_ids[i] = rows
                    texts[i] = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
                    scores[i] = seq_scores[j * returns:(j + 1) * returns]
        return Generation(texts, scores, token_ids)

    def embed(self, texts: Sequence[str], pooling: str = "last", batch_size: int | None = None,
              adapter: bool = True, progress: str | None = None) -> torch.Tensor:
        """Final-layer hidden states pooled per text ("last" real token or "mean" over real tokens),
        float32 [N, hidden] on the CPU. `adapter=False` embeds with the frozen base model."""
        if pooling not in ("last", "mean"):
            raise InputError(f"embedding pooling must be 'last' or 'mean', got {pooling!r}")
        out = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        ids = [self.tokenize(t) for t in texts]
        body = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        batches = self._batches([len(r) for r in ids], batch_size)
        if progress:
            from recalign.progress import track

            batches = track(batches, progress)
        switch = self.model.disable_adapter() if (self.is_peft and not adapter) else nullcontext()
        with self.evaluating(), switch:
            for batch in batches:
                enc = self._pad([ids[i] for i in batch], [0] * len(batch), [{}] * len(batch), None)
                hidden = body(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                              position_ids=enc.position_ids, use_cache=False).last_hidden_state.float()
                if pooling == "last":
                    pooled = hidden[:, -1]
                else:
                    mask = enc.attention_mask.unsqueeze(-1).float()
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[torch.tensor(batch)] = pooled.cpu()
        return out

    # ------------------------------------------------------------------ int8
    def _ensure_quantized(self) -> None:
        """`model.quantize: int8`: before the first forward pass, merge a loaded adapter into the weights and
        replace the decoder's linear layers by dynamically quantised int8 ones (the LM head and the embeddings
        stay float32, so the Yes/No logits are read from a float32 head)."""
        if self.quantize != "int8" or self._quantized:
            return
        from recalign.llm.precision import dtype_name, quantize_linear_layers

        if self.dtype != torch.float32:
            raise InputError(f"model.quantize: int8 needs a float32 model, this one is {dtype_name(self.dtype)}")
        if self.is_peft:
            self.model = self.model.merge_and_unload()
        quantize_linear_layers(getattr(self.causal_lm, self.causal_lm.base_model_prefix))
        self._quantized = True

    def _refuse_training_when_quantized(self, what: str) -> None:
        if self.quantize != "none":
            raise InputError(f"model.quantize: {self.quantize} is for scoring only; {what} needs model.quantize: none")

    # ------------------------------------------------------------------ LoRA / adapters
    def add_lora(self, settings: LoraSettings | None = None) -> None:
        """Wrap the model with fresh LoRA adapters (the base stays frozen). The adapter weights (and so the
        optimizer state) are float32 whatever the base dtype (peft's `autocast_adapter_dtype`)."""
        _import_peft()
        from peft import LoraConfig, get_peft_model

        # peft 0.21 calls a transformers property that transformers 5 deprecates; nothing to act on here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

        self._refuse_training_when_quantized("training LoRA adapters")
        if self.is_peft:
            raise InputError("the backbone already carries a LoRA adapter")
        settings = settings or LoraSettings()
        names = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        missing = [t for t in settings.target_modules if t not in names]
        if missing:
            raise InputError(f"lora.target_modules: {', '.join(missing)} not in the model "
                             f"(linear layers: {', '.join(sorted(_linear_names(self.model)))})")
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(self.model, config, autocast_adapter_dtype=True)

    def remove_lora(self) -> None:
        """Drop the LoRA adapter (unmerged), leaving the frozen base model."""
        if self.is_peft:
            self.model = self.model.unload()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        _import_peft()
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def set_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _import_peft()
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in state.items()})

    def save_adapter(self, path: str | Path) -> Path:
        """peft format (adapter_config.json + adapter_model.safetensors), written atomically."""
        from recalign.io import atomic_dir

        if not self.is_peft:
            raise InputError("save_adapter: the backbone has no LoRA adapter")
        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
        return Path(path)

    def load_adapter(self, path: str | Path, trainable: bool = False) -> None:
        """Read a peft adapter (float32 weights whatever the base dtype). With `model.quantize: int8` it is
        merged into the weights before they are quantised, so it must be loaded before the first scoring."""
        _import_peft()
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise InputError(f"{path}: not a peft adapter directory (no adapter_config.json)")
        if trainable:
            self._refuse_training_when_quantized("a trainable adapter")
        if self._quantized:
            raise InputError("model.quantize: int8: load the adapter before the first forward pass "
                             "(the weights it merges into are quantised by then)")
        if self.is_peft:
            from safetensors.torch import load_file

            self.set_adapter_state(load_file(str(path / "adapter_model.safetensors")))
            return
        self.model = PeftModel.from_pretrained(self.model, str(path), is_trainable=trainable,
                                               autocast_adapter_dtype=True)


@dataclass
class _Prefix:
    """A token prefix shared by a batch: its length and its KV cache (batch of one)."""

    length: int
    cache: object


def _import_peft() -> None:
    """Import peft once without the warnings of the torchao import it makes when torchao is installed."""
    from recalign.llm.precision import quiet_import

    quiet_import("peft")


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens shared by every row, leaving at least one token of each row outside the prefix."""
    if not rows:
        return 0
    first = rows[0]
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == first[length] for r in rows):
        length += 1
    return max(0, length)


def _expand_cache(cache, batch: int):
    """A cache whose every layer repeats the batch-of-one prefix `batch` times (views, no copies)."""
    from transformers import DynamicCache

    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(batch)
        return cache
    return DynamicCache([(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
                         for layer in layers])


def _strip(tokens: list[int], eos: int | None, pad: int) -> list[int]:
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens


def _greedy_scores(model, out, sequences: torch.Tensor, eos: int | None) -> torch.Tensor:
    steps = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [B, S, V]
    chosen = steps.gather(-1, sequences[:, :steps.shape[1]].unsqueeze(-1)).squeeze(-1)  # [B, S]
    valid = torch.ones_like(chosen, dtype=torch.bool)
    if eos is not None:
        ended = (sequences[:, :steps.shape[1]] == eos).long().cumsum(1)
        valid = (ended == 0) | ((ended == 1) & (sequences[:, :steps.shape[1]] == eos))
    chosen = chosen.masked_fill(~valid, 0.0)
    return (chosen.sum(1) / valid.sum(1).clamp(min=1)).cpu()


def _linear_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
