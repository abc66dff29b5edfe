"""A text engine on an OpenAI-compatible *completions* endpoint (`POST {base_url}/completions`), e.g. `vllm serve`
or raysad's own small server (policies/openai_server.py).

    engine = OpenAIEngine("runs/teacher", base_url="http://127.0.0.1:8000/v1", tokenizer="runs/teacher")
    gens = engine.generate(prompt_ids, stop=["\\n"], max_tokens=64, topk=5)

Only the standard library (urllib): retries with exponential backoff on connection errors, timeouts, 429 and
5xx; other 4xx fail at once with the server's message. `base_url` / `api_key` default to $OPENAI_BASE_URL /
$OPENAI_API_KEY (then http://127.0.0.1:8000/v1 and no key).

Tokens (token-in, token-out, as the hf and vllm engines): prompts come as token ids (encoding.encode_context)
and go to the server as ids (vLLM's completions endpoint takes them), so the engine needs the served model's
tokenizer (`tokenizer`; `model` itself when it is a local directory) for stop strings and closing. Generated
ids come from the legacy `logprobs` answer (`tokens`, `top_logprobs`); vLLM servers are asked for
`return_tokens_as_token_ids` (tokens as "token_id:123", exact); other servers' token strings are mapped
through the tokenizer (set `token_ids=False` for servers that reject the extra field; OpenAI's own API
returns at most 5 log-probs). Positions the model did not produce itself (the closing stop string, a
re-encoded tail) are scored with one teacher-forced request (`echo` + `logprobs` over prompt + completion ids).
A server that takes only text prompts: `prompt_ids=False` sends the decoded context instead; the server then
tokenises it itself, and every Generation says `reencoded=True` (next_turns records it in the turn), as it
does when the generated ids had to be re-derived from the text (`token_ids=False` and topk=0).
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from raysad.policies.base import Generation, cut_at_stop
from raysad.policies.batched import BatchedEngine

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
RETRY_STATUS = {429, 500, 502, 503, 504}
TOKEN_ID_PREFIX = "token_id:"


class OpenAIServerError(RuntimeError):
    """A completions request that failed for good (after retries, or a 4xx answer)."""


class OpenAIEngine(BatchedEngine):
    """Client engine. `model` is the served model name (for vLLM: the path or --served-model-name).

    `max_new_tokens`, `temperature`, `seed` are the defaults of `generate`. `tensor_parallel` is accepted and
    ignored (the server decides; the rollout config passes it to every backend).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 tokenizer: Any = None, timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5,
                 batch_size: int = 64, token_ids: bool = True, prompt_ids: bool = True, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = None, tensor_parallel: int | None = None):
        from raysad import models

        self.model = str(model)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if tokenizer is None and (Path(self.model) / "tokenizer_config.json").is_file():
            tokenizer = self.model
        if tokenizer is None:
            raise ValueError(f"OpenAIEngine({self.model!r}): give the served model's tokenizer (tokenizer=DIR, "
                             "a local copy): raysad sends token ids and reads token ids back")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = models.load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.batch_size, self.token_ids, self.prompt_ids = batch_size, token_ids, prompt_ids
        self.max_new_tokens, self.temperature, self.seed, self.calls = max_new_tokens, temperature, seed, 0
        self.requests = 0  # HTTP attempts made (retries included)
        host = urlparse(self.base_url).hostname or ""
        # a local server is reached directly, whatever proxy the environment names
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------------------------------- http ---
    def post(self, path: str, body: dict) -> dict:
        """POST JSON, retrying connection errors, timeouts, 429 and 5xx with exponential backoff."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode("utf-8", "replace")
                if err.code not in RETRY_STATUS:
                    raise OpenAIServerError(f"POST {url}: HTTP {err.code}: {detail}") from None
                problem = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, socket.timeout) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt < self.max_retries:
                time.sleep(min(self.backoff * 2 ** attempt, 30.0))
        raise OpenAIServerError(f"POST {url}: failed after {self.max_retries + 1} attempts "
                                f"(timeout {self.timeout}s each); last error: {problem}")

    def completions(self, prompts: list, **options) -> list[dict]:
        """The choices of one completions request, in prompt order."""
        body = {"model": self.model, "prompt": prompts, **{k: v for k, v in options.items() if v is not None}}
        answer = self.post("/completions", body)
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError) as err:
            raise OpenAIServerError(f"{self.base_url}/completions: unexpected answer {str(answer)[:300]}") from err
        if len(choices) != len(prompts):
            raise OpenAIServerError(f"{self.base_url}/completions: {len(choices)} choices for {len(prompts)} prompts")
        return choices

    # ------------------------------------------------------------------------------------- generate ---
    def _generate_batch(self, prompts, stop, max_tokens, topk, temperature, seed) -> list[Generation]:
        tok = self.tokenizer
        options = dict(max_tokens=max_tokens, temperature=temperature, stop=stop or None, seed=seed,
                       logprobs=topk if topk > 0 else None)
        # the generated ids come from the logprobs answer (text is lossy: a token may be part of a character)
        exact = self.token_ids or topk > 0
        if exact:
            options["logprobs"] = topk
        if exact and self.token_ids:
            options["return_tokens_as_token_ids"] = True
        prompt_ids = [list(p) for p in prompts]
        sent = prompt_ids if self.prompt_ids else [
            tok.decode(p, skip_special_tokens=False, clean_up_tokenization_spaces=False) for p in prompt_ids]
        try:
            choices = self.completions(sent, **options)
        except OpenAIServerError as err:
            if self.prompt_ids and "HTTP 4" in str(err):
                raise OpenAIServerError(f"{err} (if this server takes no token-id prompts, set prompt_ids=False: "
                                        "the context then goes as text and turns record reencoded)") from None
            raise
        reencoded = not self.prompt_ids or not exact
        eos = tok.eos_token_id
        gens, rescore = [], []
        for i, choice in enumerate(choices):
            reason = _finish(choice, stop)
            ids, rows = tok.encode(choice.get("text") or "", add_special_tokens=False), None
            if exact:
                logprobs = choice.get("logprobs") or {}
                ids = [self.token_id(t) for t in logprobs.get("tokens") or []]
            if topk > 0:
                rows = [self.topk_row(d, topk) for d in logprobs.get("top_logprobs") or []]
            if eos in ids:
                ids = ids[:ids.index(eos)]
            # close with the stop string the server saw (it strips it from the text), else stop[0]
            hit = choice.get("stop_reason")
            order = [hit] + [s for s in stop if s != hit] if isinstance(hit, str) and hit in stop else stop
            ids, keep, text, cut_reason = cut_at_stop(tok, ids, order)
            gen = Generation(text=text, token_ids=ids, finish_reason="stop" if cut_reason == "stop" else reason,
                             reencoded=reencoded)
            if rows is not None:
                gen.topk_ids, gen.topk_logprobs = [r[0] for r in rows[:keep]], [r[1] for r in rows[:keep]]
                if keep < len(ids):
                    rescore.append((i, keep))
            gens.append(gen)
        if rescore:
            scored = self.score([prompt_ids[i] for i, _ in rescore], [gens[i].token_ids for i, _ in rescore], topk)
            for (i, keep), (id_rows, lp_rows) in zip(rescore, scored):
                gens[i].topk_ids += id_rows[keep:]
                gens[i].topk_logprobs += lp_rows[keep:]
        return gens

    def score(self, prompt_ids: list[list[int]], continuations: list[list[int]], topk: int):
        """Top-k rows at each continuation position, by one echo request over prompt + continuation ids."""
        options = dict(max_tokens=1, temperature=0.0, echo=True, logprobs=topk)
        if self.token_ids:
            options["return_tokens_as_token_ids"] = True
        choices = self.completions([p + c for p, c in zip(prompt_ids, continuations)], **options)
        out = []
        for p, c, choice in zip(prompt_ids, continuations, choices):
            table = (choice.get("logprobs") or {}).get("top_logprobs") or []
            if len(table) < len(p) + len(c):
                raise OpenAIServerError(f"{self.base_url}: echo answer has {len(table)} log-prob rows for "
                                        f"{len(p) + len(c)} tokens (does the server support echo with logprobs?)")
            rows = [self.topk_row(table[len(p) + j], topk) for j in range(len(c))]
            out.append(([r[0] for r in rows], [r[1] for r in rows]))
        return out

    def token_logprobs(self, prompt_ids: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """The log-prob of each continuation token, teacher-forced, by one echo request over prompt +
        continuation ids (legacy `token_logprobs`; the server scores the ids sent, as vLLM's and serve_hf's do)."""
        choices = self.completions([list(p) + list(c) for p, c in zip(prompt_ids, continuations)],
                                   max_tokens=1, temperature=0.0, echo=True, logprobs=0)
        out = []
        for p, c, choice in zip(prompt_ids, continuations, choices):
            given = (choice.get("logprobs") or {}).get("token_logprobs") or []
            if len(given) < len(p) + len(c) or any(lp is None for lp in given[len(p):len(p) + len(c)]):
                raise OpenAIServerError(f"{self.base_url}: echo answer has {len(given)} token log-probs for "
                                        f"{len(p) + len(c)} tokens (does the server support echo with logprobs?)")
            out.append([float(lp) for lp in given[len(p):len(p) + len(c)]])
        return out

    # --------------------------------------------------------------------------------------- tokens ---
    def token_id(self, token: str) -> int:
        """An id from a legacy-logprobs token: "token_id:123" (vLLM), else the token's text via the tokenizer."""
        if token.startswith(TOKEN_ID_PREFIX):
            return int(token[len(TOKEN_ID_PREFIX):])
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise OpenAIServerError(f"{self.base_url}: token {token!r} does not map to one id of the tokenizer; "
                                    "use a vLLM server (token ids are then exact) or topk=0")
        return ids[0]

    def topk_row(self, entries: dict | None, k: int) -> tuple[list[int], list[float]]:
        """Exactly k (ids, log-probs), best first, from one `top_logprobs` dict (which may also hold the
        sampled token: k + 1 entries)."""
        if not entries or len(entries) < k:
            raise OpenAIServerError(f"{self.base_url}: {len(entries or {})} top log-probs where {k} were asked")
        ranked = sorted(((self.token_id(t), float(lp)) for t, lp in entries.items()), key=lambda x: -x[1])[:k]
        return [i for i, _ in ranked], [lp for _, lp in ranked]


def _finish(choice: dict, stop: list[str]) -> str:
    """Base-contract finish reason from an OpenAI choice ("stop" covers stop strings *and* EOS there;
    vLLM's `stop_reason` tells them apart: the stop string, or None for EOS)."""
    if choice.get("finish_reason") == "length":
        return "length"
    if "stop_reason" in choice:
        return "stop" if isinstance(choice["stop_reason"], str) else "eos"
    return "stop" if stop else "eos"
