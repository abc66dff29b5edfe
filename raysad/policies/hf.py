"""A text engine on transformers `generate`: batched (left padding), greedy or sampled, stop strings, top-k
log-probs of every generated token. Runs on CPU and GPU; the default engine of the tests and the quickstart.
See policies/base.py for the contract it keeps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from raysad.policies.base import Generation, call_settings, cut_at_stop


class _StopOnStrings(StoppingCriteria):
    """StoppingCriteria: a row is done once its generated text (not the prompt) contains a stop string."""

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        super().__init__()
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length
        # a stop string of n bytes lies within the last n + 1 tokens the step it completes
        self.window = max(len(s.encode()) for s in stops) + 1

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, self.prompt_length:][:, -self.window:]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class HFEngine:
    """`model` is a directory (the tokenizer then defaults to the same directory) or a loaded model."""

    def __init__(self, model: Any, tokenizer: Any = None, device: str | None = None, dtype: Any = None,
                 batch_size: int = 16, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int | None = None):
        from raysad import models

        if isinstance(model, (str, Path)):
            tokenizer = tokenizer if tokenizer is not None else model
            model = models.load_model(model, dtype=dtype, device=device)
        elif device is not None:
            model = model.to(device)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = models.load_tokenizer(tokenizer)
        if tokenizer is None:
            raise ValueError("HFEngine: a loaded model needs its tokenizer")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.seed, self.calls = temperature, seed, 0
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # special tokens the tokenizer puts before a text (e.g. BOS): prompts start with them, as training
        # examples do (segments.encode_trajectory); none are appended (the model continues the prompt)
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prefix_ids = full[:full.index(plain[0])] if plain and plain[0] in full else []

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Prompt token ids as the model sees them (leading special tokens included)."""
        return [self.prefix_ids + ids for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]

    # ------------------------------------------------------------------------------------- generate ---
    def generate(self, prompts: list[str], stop: list[str] | None = None, max_tokens: int | None = None,
                 topk: int = 0, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        stop, max_tokens, temperature, seed = call_settings(self, stop, max_tokens, temperature, seed)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._generate_batch(prompts[start:start + self.batch_size], stop, max_tokens, topk,
                                        temperature, seed)
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts, stop, max_tokens, topk, temperature, seed) -> list[Generation]:
        tok = self.tokenizer
        prompt_ids = self.encode(prompts)
        if any(not p for p in prompt_ids):
            raise ValueError("generate: an empty prompt (no tokens) has nothing to continue from")
        prompt_length = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompts), prompt_length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding: every row's next token is at the same column
            ids[i, prompt_length - len(p):], mask[i, prompt_length - len(p):] = torch.tensor(p), 1
        enc = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if seed is not None:
            torch.manual_seed(seed)
        sampling = temperature > 0
        options = dict(max_new_tokens=max_tokens, do_sample=sampling, pad_token_id=tok.pad_token_id,
                       eos_token_id=sorted(self.eos_ids) or None, return_dict_in_generate=True,
                       output_logits=topk > 0)
        if sampling:  # plain sampling from softmax(logits / T): no top-k/top-p truncation
            options.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        criteria = StoppingCriteriaList([_StopOnStrings(tok, stop, prompt_length)]) if stop else None
        result = self.model.generate(**enc, stopping_criteria=criteria, **options)
        generated = result.sequences[:, prompt_length:].tolist()
        rows = None
        if topk > 0:  # (batch, steps, k) from the raw logits of every step
            logprobs = torch.stack(result.logits, dim=1).float().log_softmax(-1)
            values, indices = logprobs.topk(min(topk, logprobs.shape[-1]), dim=-1)
            rows = (indices.tolist(), values.tolist())

        gens, rescore = [], []
        for b, ids in enumerate(generated):
            cut = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            eos = cut is not None
            ids = ids[:cut] if eos else ids
            ids, keep, text, reason = cut_at_stop(tok, ids, stop)
            gen = Generation(text=text, token_ids=ids, finish_reason="eos" if eos and reason == "length" else reason)
            if rows is not None:
                gen.topk_ids, gen.topk_logprobs = rows[0][b][:keep], rows[1][b][:keep]
                if keep < len(ids):
                    rescore.append((b, keep))
            gens.append(gen)
        if rescore:  # tokens the model did not generate itself: their top-k by one forward pass
            scored = self.score([prompts[b] for b, _ in rescore], [gens[b].token_ids for b, _ in rescore], topk)
            for (b, keep), (ids_rows, lp_rows) in zip(rescore, scored):
                gens[b].topk_ids += ids_rows[keep:]
                gens[b].topk_logprobs += lp_rows[keep:]
        return gens

    # ---------------------------------------------------------------------------------------- score ---
    @torch.no_grad()
    def score(self, prompts: list[str], continuations: list[list[int]], topk: int
              ) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Top-k ids and log-probs of the model's next-token distribution at each continuation position,
        given the prompt's tokens and the continuation before it (teacher forcing)."""
        tok = self.tokenizer
        prompt_ids = self.encode(prompts)
        if any(not p for p in prompt_ids):
            raise ValueError("score: every prompt needs at least one token (the first position has no context)")
        seqs = [p + c for p, c in zip(prompt_ids, continuations)]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..n-1, pads come after
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for i, (p, c) in enumerate(zip(prompt_ids, continuations)):
            rows = logits[i, len(p) - 1:len(p) - 1 + len(c)].float().log_softmax(-1)
            values, indices = rows.topk(min(topk, rows.shape[-1]), dim=-1)
            out.append((indices.tolist(), values.tolist()))
        return out
