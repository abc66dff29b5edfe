"""`serve_hf`: a small OpenAI-compatible *completions* server (standard library) over raysad's HF engine, for
tests and laptops (use `vllm serve` for throughput); policies/openai_client.py's OpenAIEngine talks to it.

    server = serve_hf("runs/teacher", port=8000)          # or: python -m raysad.policies.openai_server DIR
    engine = OpenAIEngine("runs/teacher", base_url=server.url, tokenizer="runs/teacher")

Like OpenAI and vLLM it takes prompts as text or token ids and answers legacy `logprobs` (vLLM's
`return_tokens_as_token_ids` too). Hardened: an optional API key, 4xx/5xx JSON answers instead of dropped
connections, per-connection timeouts and request limits.
"""
from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from raysad.policies.openai_client import TOKEN_ID_PREFIX


class RequestError(ValueError):
    """A request the server refuses with a 4xx answer (`status`, default 400)."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionHandler(BaseHTTPRequestHandler):
    """POST /v1/completions (legacy format: prompt str | [str] | [int] | [[int]], max_tokens, temperature,
    stop, seed, logprobs, echo, return_tokens_as_token_ids; n=1) and GET /v1/models. Like OpenAI and vLLM the
    returned text leaves out the stop string, and finish_reason / stop_reason say why generation ended.

    Hardening: with the server's `api_key` set every request needs `Authorization: Bearer <key>` (401
    otherwise); a malformed request gets a 4xx JSON answer, an unexpected exception a 500 one, never a dropped
    connection; each socket operation waits at most the server's `request_timeout` seconds and a body must
    arrive whole within it (408 otherwise), so a silent or lying client cannot hold a handler thread."""

    server: "CompletionServer"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.request_timeout  # StreamRequestHandler applies it to the connection
        super().setup()

    def log_message(self, fmt, *args):  # quiet: tests and rollouts make many requests
        pass

    def _send(self, status: int, payload: dict, close: bool = False) -> None:
        body = json.dumps(payload).encode()  # one line
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", close: bool = False) -> None:
        message = " ".join(str(message).split())[:1000]  # one line, bounded
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, close=close)

    def _guarded(self, work) -> None:
        """Run `work`; a RequestError answers its 4xx, anything else 500 (one-line JSON), and the connection is
        closed after any answer that left the request body unread."""
        self._body_read, self._timed_out = False, False
        try:
            work()
        except RequestError as err:
            self._reply_error(err.status, str(err), err.kind)
        except Exception as err:  # noqa: BLE001 -- answer, never drop the connection
            self._reply_error(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    def _reply_error(self, status: int, message: str, kind: str) -> None:
        close = self._timed_out or not self._body_read
        if close and not self._timed_out:
            self._discard_body()
        try:
            self._error(status, message, kind, close=close)
        except OSError:  # the client went away (or timed out) meanwhile: nothing left to answer
            self.close_connection = True

    def _discard_body(self) -> None:
        """Read and drop what the client already sent of an unread body (briefly, bounded), so closing the socket
        does not reset the connection before the client reads the answer."""
        try:
            left = min(max(int(self.headers.get("Content-Length") or 0), 0), self.server.max_body_bytes)
        except ValueError:
            left = 0
        deadline = time.monotonic() + min(self.server.request_timeout, 1.0)
        try:
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        finally:
            try:
                self.connection.settimeout(self.server.request_timeout)
            except OSError:
                pass

    def _authorize(self) -> None:
        key = self.server.api_key
        if not key:
            return
        given = self.headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        # compare in constant time (bytes: compare_digest takes ASCII-only str)
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                   key.encode())):
            raise RequestError("missing or wrong API key (send 'Authorization: Bearer <key>')", 401,
                               "authentication_error")

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("chunked bodies are not supported: send Content-Length", 411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("Content-Length is required", 411)
        try:
            length = int(length)
        except ValueError:
            raise RequestError(f"bad Content-Length {length[:40]!r}") from None
        if length < 0:
            raise RequestError(f"bad Content-Length {length}")
        cap = self.server.max_body_bytes
        if length > cap:
            raise RequestError(f"body of {length} bytes is over the limit of {cap} bytes", 413)
        # the whole body within request_timeout, however it trickles in
        deadline, chunks, left = time.monotonic() + self.server.request_timeout, [], length
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    raise RequestError(f"body ended after {length - left} of {length} bytes", 400)
                chunks.append(chunk)
                left -= len(chunk)
        except (TimeoutError, socket.timeout):
            self._timed_out = True  # close without draining: the client is not sending it
            raise RequestError(f"timed out after {self.server.request_timeout}s waiting for the body "
                               f"({length - left} of {length} bytes came)", 408) from None
        finally:
            self.connection.settimeout(self.server.request_timeout)
        self._body_read = True
        try:
            request = json.loads(b"".join(chunks))
        except RecursionError:
            raise RequestError("body is nested too deeply") from None
        except ValueError as err:  # bad JSON or bad UTF-8
            raise RequestError(f"body is not JSON: {err}") from None
        if not isinstance(request, dict):
            raise RequestError(f"body must be a JSON object, not {type(request).__name__}")
        return request

    def do_GET(self):
        def work():
            self._authorize()
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
            else:
                raise RequestError(f"no route {self.path}", 404)
        self._guarded(work)

    def do_POST(self):
        def work():
            self._authorize()
            if self.path.rstrip("/") != "/v1/completions":
                raise RequestError(f"no route {self.path}", 404)
            request = self._read_json()
            try:
                answer = self.server.complete(request)
            except RequestError:
                raise
            except ValueError as err:  # the engine's own refusal of this input
                raise RequestError(str(err)) from None
            self._send(200, answer)
        self._guarded(work)


class CompletionServer(ThreadingHTTPServer):
    """A completions server over an HF engine; `url` is its base URL (…/v1). One request runs at a time.

    `api_key`: when set, requests need `Authorization: Bearer <api_key>`. `request_timeout`: seconds each
    socket operation may wait, and the whole body may take, per connection. `max_body_bytes`,
    `max_tokens_cap`, `max_logprobs`: the largest body, max_tokens and logprobs a request may ask for."""

    daemon_threads = True

    def __init__(self, engine, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 handler: type[BaseHTTPRequestHandler] = CompletionHandler, api_key: str | None = None,
                 request_timeout: float = 10.0, max_body_bytes: int = 16 * 1024 * 1024,
                 max_tokens_cap: int = 4096, max_logprobs: int = 20):
        if not (math.isfinite(request_timeout) and request_timeout > 0):
            raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        super().__init__((host, port), handler)
        self.engine, self.model_name, self.lock = engine, model_name, threading.Lock()
        self.api_key = api_key or None
        self.request_timeout, self.max_body_bytes = float(request_timeout), int(max_body_bytes)
        self.max_tokens_cap, self.max_logprobs = int(max_tokens_cap), int(max_logprobs)
        self.url = f"http://{host}:{self.server_address[1]}/v1"
        self.thread: threading.Thread | None = None

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: [0, vocab_size) (the model's input embedding rows)."""
        model = getattr(self.engine, "model", None)
        try:
            return int(model.get_input_embeddings().num_embeddings)
        except AttributeError:
            size = getattr(getattr(model, "config", None), "vocab_size", None)
            return int(size) if size else len(self.engine.tokenizer)

    def handle_error(self, request, client_address) -> None:
        """A client that went away or fell silent between requests is no error worth a traceback."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def start(self) -> "CompletionServer":
        self.thread = threading.Thread(target=self.serve_forever, name="raysad-completions", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _options(self, request: dict) -> dict:
        """The request's settings, checked (RequestError for anything out of range)."""
        n = request.get("n", 1)
        if not _is_int(n) or n != 1:
            raise RequestError("only n=1 is supported")
        max_tokens = request.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if not _is_int(max_tokens) or not 1 <= max_tokens <= self.max_tokens_cap:
            raise RequestError(f"max_tokens must be an integer in [1, {self.max_tokens_cap}], got {max_tokens!r}")
        k = request.get("logprobs")
        if k is not None and (not _is_int(k) or not 0 <= k <= self.max_logprobs):
            raise RequestError(f"logprobs must be an integer in [0, {self.max_logprobs}], got {k!r}")
        temperature = request.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                or not math.isfinite(temperature) or temperature < 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings")
        seed = request.get("seed")
        if seed is not None and not _is_int(seed):
            raise RequestError(f"seed must be an integer, got {seed!r}")
        return dict(n=n, max_tokens=max_tokens, k=k, temperature=float(temperature), stop=list(stop), seed=seed)

    def _prompt_ids(self, prompts) -> list[list[int]]:
        """The prompts as token ids: each a string (encoded) or a list of ids in [0, vocab_size)."""
        tok = self.engine.tokenizer
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and _is_int(prompts[0])):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise RequestError("'prompt' must be a string, a list of strings, or token ids")
        vocab, out = self.vocab_size, []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = tok.encode(p, add_special_tokens=False)
            elif isinstance(p, list):
                bad = next((t for t in p if not _is_int(t) or not 0 <= t < vocab), None)
                if bad is not None or any(not _is_int(t) for t in p):
                    raise RequestError(f"prompt {i}: token ids must be integers in [0, {vocab}), got {bad!r}")
                ids = list(p)
            else:
                raise RequestError(f"prompt {i}: must be a string or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise RequestError(f"prompt {i} is empty")
            out.append(ids)
        return out

    def complete(self, request: dict) -> dict:
        if not isinstance(request, dict):
            raise RequestError(f"body must be a JSON object, not {type(request).__name__}")
        tok = self.engine.tokenizer
        opts = self._options(request)
        prompt_ids = self._prompt_ids(request.get("prompt"))
        stop, k = opts["stop"], opts["k"]
        as_ids = bool(request.get("return_tokens_as_token_ids"))
        echo = bool(request.get("echo"))
        texts = [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in prompt_ids]
        with self.lock:
            gens = self.engine.generate(prompt_ids, stop=stop or None, max_tokens=opts["max_tokens"], topk=0,
                                        temperature=opts["temperature"], seed=opts["seed"])
            choices = [self._choice(i, ids, text, gen, stop, k, echo, as_ids)
                       for i, (ids, text, gen) in enumerate(zip(prompt_ids, texts, gens))]
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices}

    def _choice(self, index, prompt_ids, prompt_text, gen, stop, k, echo, as_ids) -> dict:
        tok = self.engine.tokenizer
        text, stop_reason = gen.text, None
        ended = next((s for s in stop if text.endswith(s)), None)
        if ended is not None:  # the engine keeps (or appended) the stop string; the API leaves it out
            text = text[:len(text) - len(ended)]
            stop_reason = ended if gen.finish_reason == "stop" else None
        finish = "length" if gen.finish_reason == "length" else "stop"
        choice = {"index": index, "text": (prompt_text if echo else "") + text, "finish_reason": finish,
                  "stop_reason": stop_reason, "logprobs": None}
        if k is not None:
            # the model's own tokens that cover `text` (the last one may run into the stop string, as vLLM's do)
            ids = list(gen.token_ids)
            n = next((p for p in range(len(ids) + 1) if len(tok.decode(ids[:p], skip_special_tokens=False,
                      clean_up_tokenization_spaces=False)) >= len(text)), len(ids))
            ids = ids[:n]
            choice["logprobs"] = self._logprobs(prompt_ids, ids, int(k), echo, as_ids)
        return choice

    def _logprobs(self, prompt_ids, ids, k, echo, as_ids) -> dict:
        """Legacy logprobs of the completion's tokens (and, with echo, of the prompt's; its first is None),
        from one teacher-forced forward pass of the model."""
        import torch

        tok, model = self.engine.tokenizer, self.engine.model
        seq = prompt_ids + ids
        with torch.no_grad():
            rows = model(torch.tensor([seq], device=self.engine.device)).logits[0].float().log_softmax(-1).cpu()
        first = 0 if echo else len(prompt_ids)

        def name(i: int) -> str:
            return f"{TOKEN_ID_PREFIX}{i}" if as_ids else tok.decode([i], skip_special_tokens=False)

        tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
        for pos in range(first, len(seq)):
            tokens.append(name(seq[pos]))
            offsets.append(offset)
            offset += len(tok.decode([seq[pos]], skip_special_tokens=False))
            if pos == 0:
                token_lps.append(None)
                tops.append(None)
                continue
            row = rows[pos - 1]
            token_lps.append(float(row[seq[pos]]))
            values, indices = row.topk(min(k, row.shape[-1])) if k > 0 else (row[:0], row[:0].long())
            top = {name(int(i)): float(v) for i, v in zip(indices, values)}
            top.setdefault(name(seq[pos]), float(row[seq[pos]]))  # the chosen token too, as OpenAI does
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def serve_hf(model_path: str | Path, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
             handler: type[BaseHTTPRequestHandler] = CompletionHandler, api_key: str | None = None,
             request_timeout: float = 10.0, max_body_bytes: int = 16 * 1024 * 1024, max_tokens_cap: int = 4096,
             max_logprobs: int = 20, **engine_kwargs) -> CompletionServer:
    """Start a completions server for a local HF model in a background thread; returns it (`.url`, `.close()`).
    port 0 picks a free port. `api_key`: require `Authorization: Bearer <api_key>` (None: open).
    `request_timeout`: per-connection socket timeout in seconds (also the whole-body deadline).
    `max_body_bytes` / `max_tokens_cap` / `max_logprobs`: request limits (413 / 400 beyond them).
    `engine_kwargs` go to HFEngine (device, dtype, batch_size ...)."""
    from raysad.policies.hf import HFEngine

    engine = HFEngine(str(model_path), **engine_kwargs)
    return CompletionServer(engine, model_name or str(model_path), host, port, handler, api_key=api_key,
                            request_timeout=request_timeout, max_body_bytes=max_body_bytes,
                            max_tokens_cap=max_tokens_cap, max_logprobs=max_logprobs).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local HF model on an OpenAI-compatible "
                                     "/v1/completions endpoint (small, for tests and laptops; use `vllm serve` "
                                     "for throughput).")
    parser.add_argument("model", help="local HF model directory (with its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request (default: "
                             "$RAYSAD_SERVER_API_KEY; unset: no auth). Prefer the variable: flags show in `ps`")
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="seconds a connection may stay silent, and a request body may take (default 10)")
    parser.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs a request may ask")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        parser.error("--request-timeout must be a positive number of seconds")
    api_key = args.api_key if args.api_key is not None else (os.environ.get("RAYSAD_SERVER_API_KEY") or None)
    server = serve_hf(args.model, args.host, args.port, device=args.device, api_key=api_key,
                      request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                      max_tokens_cap=args.max_tokens_cap, max_logprobs=args.max_logprobs)
    auth = "API key required" if api_key else "no API key"
    print(f"serving {args.model} at {server.url} ({auth}; Ctrl-C stops)", flush=True)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {args.host} is reachable from other machines and no API key is set "
              "(--api-key or $RAYSAD_SERVER_API_KEY)", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
