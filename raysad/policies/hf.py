"""A text engine on transformers models: batched (left padding), greedy or sampled, stop strings, top-k
log-probs of every generated token, and a prefix cache. Runs on CPU and GPU; the default engine of the tests
and the quickstart. See policies/base.py for the contract it keeps.

The prefix cache is what makes agent rollouts affordable: a ReAct episode asks for the thought, then for the
action on a prompt that extends the thought's (prompt + thought + delimiters), then for the next thought on a
prompt that extends that (+ action + observation), and so on. Without a cache every call re-reads the whole
context (two full prefills per turn, growing with the episode); with it a call reads only what is new since
the longest cached token prefix. Keys and values of a prefix depend only on its tokens and their positions, so
reusing them is exact (up to float rounding of a different batch shape). The decoding loop is ours, not
`model.generate`, because a batch then mixes rows whose cached prefixes have different lengths:

    columns:  [ cached KV, right-aligned | new prompt tokens, right-aligned | generated tokens ]
    row 0:      . . c c c c c c            . . p p                          g g g
    row 1:      c c c c c c c c            p p p p                          g g g

('.' is padding, masked out.) Every token keeps its true position (position_ids), so padding in the middle of
a row changes nothing. The mask is a 4D additive one we build, which eager and SDPA attention both take.
Models whose cache is not a plain per-layer key/value store (sliding windows, recurrent layers) run the same
loop without reuse.
"""
from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from raysad.policies.base import Generation, cut_at_stop
from raysad.policies.batched import BatchedEngine


class PrefixCache:
    """Per-sequence keys/values keyed by their token ids; `longest(ids)` finds the longest reusable prefix.

    LRU with `capacity` entries. An entry whose every token a newer entry extends is dropped (that row moved
    on), so an agent loop keeps about one entry per episode in flight and `capacity` should exceed the number
    of episodes an engine serves at once (rollout: env_actors x envs_per_actor).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self.next_key = 0
        self.hits = self.lookups = self.reused_tokens = self.prompt_tokens = 0

    def longest(self, ids: list[int]) -> tuple[int | None, int]:
        """(entry key, n): the entry sharing the longest token prefix with `ids`, capped at len(ids) - 1 (the
        last prompt token is always run: its logits give the first new token); (None, 0) when none."""
        query = torch.tensor(ids)
        best, best_n = None, 0
        for key, (entry_ids, _) in self.entries.items():
            m = min(len(entry_ids), len(ids) - 1)
            if m <= best_n:
                continue
            same = entry_ids[:m] == query[:m]
            n = m if bool(same.all()) else int(same.int().argmin())
            if n > best_n:
                best, best_n = key, n
        self.lookups += 1
        self.prompt_tokens += len(ids)
        if best is not None:
            self.hits += 1
            self.reused_tokens += best_n
            self.entries.move_to_end(best)
        return best, best_n

    def kv(self, key: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n positions of an entry's keys/values, one (k, v) per layer, each [heads, n, head_dim]."""
        return [(k[:, :n], v[:, :n]) for k, v in self.entries[key][1]]

    def add(self, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], extends: tuple[int | None, int]):
        source, n = extends
        if source is not None and source in self.entries and n >= len(self.entries[source][0]):
            del self.entries[source]  # fully contained in the new entry
        self.entries[self.next_key] = (torch.tensor(ids), kv)
        self.next_key += 1
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def stats(self) -> dict[str, float]:
        return {"lookups": self.lookups, "hits": self.hits, "entries": len(self.entries),
                "reused_token_fraction": self.reused_tokens / max(self.prompt_tokens, 1)}


@functools.cache
def _growing_layer():
    """GrowingLayer, a transformers DynamicLayer whose keys and values sit in a buffer with spare columns: a
    decode step writes its column in place, where DynamicLayer copies the whole cache (torch.cat: 19% of an hf
    engine's decode samples on a CPU). `keys`/`values` are views of the filled columns, so everything that
    reads a DynamicLayer (prefix cache, row dropping) reads this one alike."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = None
            n, new = self.get_seq_length(), key_states.shape[-2]
            if self.buffers is None or n + new > self.buffers[0].shape[-2]:
                # half as many spare columns as filled ones: a few copies per call, not one per step
                shape = (*key_states.shape[:-2], n + new + max(8, (n + new) // 2), key_states.shape[-1])
                buffers = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    buffers[0][..., :n, :], buffers[1][..., :n, :] = self.keys, self.values
                self.buffers = buffers
            keys, values = self.buffers
            keys[..., n:n + new, :], values[..., n:n + new, :] = key_states, value_states
            self.keys, self.values = keys[..., :n + new, :], values[..., :n + new, :]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            n = self.get_seq_length()
            if n > 0:
                self.buffers = tuple(b[indices] for b in self.buffers)
                self.keys, self.values = self.buffers[0][..., :n, :], self.buffers[1][..., :n, :]

    return GrowingLayer


def _growing_cache(model):
    """A cache for `model` whose layers grow in place (_growing_layer); None (the model then builds its own)
    where its layers are not all plain full-attention ones (sliding windows, recurrent layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers before 4.56: no per-layer cache objects to replace
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    cache.layers = [_growing_layer()() for _ in layers]
    return cache


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A transformers cache as (keys, values) per layer ([batch, heads, seq, head_dim]), or None when it is not
    a plain full-attention store whose tensors can be cut and stitched (then no prefix reuse)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        if all(type(layer).__name__ in ("DynamicLayer", "GrowingLayer") for layer in layers):
            return [(layer.keys, layer.values) for layer in layers]
        return None
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return None


def _hit_stop(tokenizer, ids: list[int], stops: list[str], window: int) -> bool:
    """Whether the generated ids (a row's own, not the prompt) end in text containing a stop string; a stop of
    n bytes lies within the last n + 1 tokens the step it completes."""
    text = tokenizer.decode(ids[-window:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return any(s in text for s in stops)


class HFEngine(BatchedEngine):
    """`model` is a directory (the tokenizer then defaults to the same directory) or a loaded model.
    `prefix_cache` is how many sequences' keys/values to keep for reuse (0: none). `drop_finished`: rows that
    have stopped leave the decode batch once they are half of it (False: a static batch, decoded until its
    longest row stops; kept for benchmarks/prefix_cache.py --compare finished_rows). `growing_cache`: decode
    steps write keys/values in place (False: transformers' DynamicLayer, which copies the cache each step; kept
    for --compare growing_cache)."""

    def __init__(self, model: Any, tokenizer: Any = None, device: str | None = None, dtype: Any = None,
                 batch_size: int = 16, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int | None = None, prefix_cache: int = 128, drop_finished: bool = True,
                 growing_cache: bool = True):
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
        self.drop_finished, self.growing_cache = drop_finished, growing_cache
        self.decoded_rows = 0  # rows fed through decode steps, in all: what finished rows no longer cost
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # transformers renamed past_key_values to cache (5.x); older releases know only the first
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def counters(self) -> dict[str, int]:
        """Work counters since the engine started, summed over calls (the rollout's MLflow metrics take their
        difference over a run): decode rows, and the prompt tokens the prefix cache saved."""
        cache = self.prefix_cache
        return {"decoded_rows": self.decoded_rows, "prompt_tokens": cache.prompt_tokens if cache else 0,
                "prefix_reused_tokens": cache.reused_tokens if cache else 0}

    # ------------------------------------------------------------------------------------- generate ---
    def load_weights(self, folder: str | Path, seed: int | None = None) -> None:
        """Replace the model with the one saved in `folder`: the same architecture and vocabulary (on-policy
        distillation's student after its latest training). The prefix cache goes: its keys and values were
        computed by the old weights. `seed`: sample from now on as an engine built with that seed would."""
        from raysad import models

        model = models.load_model(folder, dtype=self.model.dtype, device=str(self.device))
        if (type(model) is not type(self.model) or model.config.vocab_size != self.model.config.vocab_size
                or model.config.num_hidden_layers != self.model.config.num_hidden_layers):
            raise ValueError(f"{folder}: not the engine's architecture ({type(model).__name__}, "
                             f"{model.config.num_hidden_layers} layers, vocabulary {model.config.vocab_size}); "
                             "start a new engine for another model")
        self.model = model.eval()
        if self.prefix_cache is not None:
            self.prefix_cache = PrefixCache(self.prefix_cache.capacity)
        if seed is not None:
            self.seed, self.calls = seed, 0

    def _forward(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, cache):
        """Run the new columns `ids` [B, q] against the cache; `valid` [B, kv] marks the real (non-pad) columns
        of cache + new. Returns (last position's logits [B, V], cache)."""
        q, kv = ids.shape[1], valid.shape[1]
        causal = torch.ones(q, kv, dtype=torch.bool, device=ids.device).tril(kv - q)
        allowed = causal[None] & valid[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.model.dtype).min)[:, None]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kwarg: cache}, **self._keep_last)
        return out.logits[:, -1].float(), getattr(out, self._cache_kwarg)

    def _new_cache(self):
        """An empty cache for a batch (_growing_cache), or None: the model builds its own."""
        return _growing_cache(self.model) if self.growing_cache else None

    def _stitched_cache(self, rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None], width: int):
        """A batch cache of `width` columns from per-row cached keys/values (right-aligned, left-padded)."""
        from transformers import DynamicCache

        template = next(r for r in rows if r is not None)
        cache = self._new_cache() or DynamicCache()
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros(len(rows), k0.shape[0], width, k0.shape[-1])
            values = v0.new_zeros(len(rows), v0.shape[0], width, v0.shape[-1])
            for b, row in enumerate(rows):
                if row is not None:
                    k, v = row[layer]
                    keys[b, :, width - k.shape[1]:], values[b, :, width - v.shape[1]:] = k, v
            cache.update(keys, values, layer)
        return cache

    @torch.no_grad()
    def _generate_batch(self, prompts, stop, max_tokens, topk, temperature, seed) -> list[Generation]:
        tok, device = self.tokenizer, self.device
        prompt_ids = [list(p) for p in prompts]
        if any(not p for p in prompt_ids):
            raise ValueError("generate: an empty prompt (no tokens) has nothing to continue from")
        batch = len(prompt_ids)
        pc = self.prefix_cache
        matches = [pc.longest(p) for p in prompt_ids] if pc is not None else [(None, 0)] * batch
        reused = [n for _, n in matches]
        width = max(reused)  # cached columns
        new = max(len(p) - n for p, n in zip(prompt_ids, reused))  # new prompt columns
        cache = self._stitched_cache([pc.kv(key, n) if key is not None else None for key, n in matches],
                                     width) if width else self._new_cache()
        ids = torch.full((batch, new), tok.pad_token_id, dtype=torch.long)
        valid = torch.zeros(batch, width + new, dtype=torch.bool)
        positions = torch.zeros(batch, new, dtype=torch.long)
        for b, (p, n) in enumerate(zip(prompt_ids, reused)):
            fresh = p[n:]
            ids[b, new - len(fresh):] = torch.tensor(fresh)
            valid[b, width - n:width] = True
            valid[b, width + new - len(fresh):] = True
            positions[b, new - len(fresh):] = torch.arange(n, len(p))
        ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)
        logits, cache = self._forward(ids, valid, positions, cache)

        generator = None
        if temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed) if seed is not None else generator.seed()  # (the global RNG untouched)
        window = max((len(s.encode()) for s in stop), default=0) + 1
        generated = [[] for _ in range(batch)]
        done = [False] * batch
        rows_topk: list[tuple[list, list]] = [([], []) for _ in range(batch)]
        next_position = torch.tensor([len(p) for p in prompt_ids], device=device)
        live = list(range(batch))  # the prompt row at each position of the decode batch
        droppable = self.drop_finished and hasattr(cache, "batch_select_indices")
        for step in range(max_tokens):
            if topk > 0:
                values, indices = logits.log_softmax(-1).topk(min(topk, logits.shape[-1]), dim=-1)
                values, indices = values.tolist(), indices.tolist()
            if generator is not None:  # plain sampling from softmax(logits / T): no top-k/top-p truncation
                choice = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
            else:
                choice = logits.argmax(-1)
            for pos, token in enumerate(choice.tolist()):
                b = live[pos]
                if done[b]:
                    continue
                generated[b].append(token)
                if topk > 0:
                    rows_topk[b][0].append(indices[pos])
                    rows_topk[b][1].append(values[pos])
                if token in self.eos_ids or (stop and _hit_stop(tok, generated[b], stop, window)):
                    done[b] = True
            if all(done) or step == max_tokens - 1:
                break
            finished = [pos for pos, b in enumerate(live) if done[b]] if droppable else []
            if finished and 2 * len(finished) >= len(live):
                # half the batch has stopped: drop those rows rather than decode them on to the longest one's
                # end (the copy of the cache this costs is paid at most log2(batch) times per call)
                self._remember([(live[pos], pos) for pos in finished], prompt_ids, generated, width + new,
                               valid, cache, matches)
                keep = torch.tensor([pos for pos, b in enumerate(live) if not done[b]], device=device)
                cache.batch_select_indices(keep)
                valid, next_position, choice = valid[keep], next_position[keep], choice[keep]
                live = [live[pos] for pos in keep.tolist()]
            self.decoded_rows += len(live)
            valid = torch.cat([valid, torch.ones(len(live), 1, dtype=torch.bool, device=device)], dim=1)
            logits, cache = self._forward(choice[:, None], valid, next_position[:, None], cache)
            next_position = next_position + 1

        self._remember(list(zip(live, range(len(live)))), prompt_ids, generated, width + new, valid, cache, matches)

        gens, rescore = [], []
        for b, ids in enumerate(generated):
            cut = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            eos = cut is not None
            ids = ids[:cut] if eos else ids
            ids, keep, text, reason = cut_at_stop(tok, ids, stop)
            gen = Generation(text=text, token_ids=ids, finish_reason="eos" if eos and reason == "length" else reason)
            if topk > 0:
                gen.topk_ids, gen.topk_logprobs = rows_topk[b][0][:keep], rows_topk[b][1][:keep]
                if keep < len(ids):
                    rescore.append((b, keep))
            gens.append(gen)
        if rescore:  # tokens the model did not generate itself: their top-k by one forward pass
            scored = self.score([prompt_ids[b] for b, _ in rescore], [gens[b].token_ids for b, _ in rescore], topk)
            for (b, keep), (ids_rows, lp_rows) in zip(rescore, scored):
                gens[b].topk_ids += ids_rows[keep:]
                gens[b].topk_logprobs += lp_rows[keep:]
        return gens

    def _remember(self, rows, prompt_ids, generated, prompt_columns, valid, cache, matches) -> None:
        """Store the keys/values of each (prompt row, batch position) in `rows` (prompt + its first len - 1
        generated tokens) in the prefix cache. Those ran while the row was live, in the columns right after the
        prompt's. Its last token ran only if other rows went on, and the columns after it hold tokens that are
        not the row's, so it is left out."""
        if self.prefix_cache is None:
            return
        layers = _cache_layers(cache)
        if layers is None:
            self.prefix_cache = None  # this model's cache cannot be stitched: stop trying
            return
        for b, pos in rows:
            run = max(len(generated[b]) - 1, 0)
            columns = valid[pos, :prompt_columns].nonzero()[:, 0]
            columns = torch.cat([columns, torch.arange(prompt_columns, prompt_columns + run, device=columns.device)])
            kv = [(k[pos][:, columns], v[pos][:, columns]) for k, v in layers]
            self.prefix_cache.add(prompt_ids[b] + generated[b][:run], kv, matches[b])

    # ---------------------------------------------------------------------------------------- score ---
    def score(self, prompts: list[list[int]], continuations: list[list[int]], topk: int
              ) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Top-k ids and log-probs of the model's next-token distribution at each continuation position,
        given the prompt's ids and the continuation before it (teacher forcing)."""
        out = []
        for rows, _ in self._teacher_forced(prompts, continuations):
            values, indices = rows.topk(min(topk, rows.shape[-1]), dim=-1)
            out.append((indices.tolist(), values.tolist()))
        return out

    def token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """The log-prob of each continuation token, given the prompt and the continuation before it (teacher
        forcing): what a model's cross-entropy on given tokens is made of."""
        return [rows.gather(-1, c[:, None])[:, 0].tolist() for rows, c in self._teacher_forced(prompts, continuations)]

    @torch.no_grad()
    def _teacher_forced(self, prompts: list[list[int]], continuations: list[list[int]]):
        """One forward over the requests (right-padded); per request: (log-softmax rows [len(c), V] at its
        continuation's positions, the continuation's ids as a tensor)."""
        tok = self.tokenizer
        prompt_ids = [list(p) for p in prompts]
        if any(not p for p in prompt_ids):
            raise ValueError("score: every prompt needs at least one token (the first position has no context)")
        seqs = [p + list(c) for p, c in zip(prompt_ids, continuations)]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..n-1, pads come after
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        for i, (p, c) in enumerate(zip(prompt_ids, continuations)):
            rows = logits[i, len(p) - 1:len(p) - 1 + len(c)].float().log_softmax(-1)
            yield rows, torch.tensor(list(c), dtype=torch.long, device=rows.device)
