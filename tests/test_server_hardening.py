"""The completions server (serve_hf) under malformed and hostile requests, on 127.0.0.1 only: an optional API
key; a 4xx JSON answer (never a dropped connection) for every malformed request; a per-connection socket
timeout for bodies shorter than their Content-Length; 500 with a JSON error for unexpected exceptions."""
from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time

import pytest

from raysad.policies import openai_server
from raysad.policies.openai_client import OpenAIEngine, OpenAIServerError
from raysad.policies.openai_server import serve_hf

pytestmark = pytest.mark.timeout(120)

KEY = "s3cret-key"
TIMEOUT = 0.5  # the server's per-connection socket timeout in these tests
TEXTS = ["Thought 1: I need to search France.\nAction 1: Search[France]\n", "> go to table 1\nOn the table.\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from raysad import models

    out = tmp_path_factory.mktemp("tiny_hardening")
    tokenizer = models.train_tokenizer(TEXTS * 20, vocab_size=300)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=128)
    models.build_tiny_model(size, tokenizer, seed=0).save_pretrained(out)
    models.save_tokenizer(tokenizer, out)
    return out


@pytest.fixture(scope="module")
def server(model_dir):
    with serve_hf(model_dir, device="cpu", api_key=KEY, request_timeout=TIMEOUT, max_body_bytes=64 * 1024,
                  max_tokens_cap=64, max_logprobs=5) as srv:
        yield srv


@pytest.fixture(scope="module")
def vocab(server):
    return server.vocab_size


def request(server, method, path, body: bytes | None = None, headers: dict | None = None, key: str | None = KEY):
    """One request on a fresh connection: (status, parsed JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
        assert b"\n" not in raw.strip(), raw  # one-line JSON
        return response.status, json.loads(raw)
    finally:
        conn.close()


def post(server, payload, **kw):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(server, "POST", "/v1/completions", body, **kw)


def raw_exchange(server, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes (leaving the socket open), read until the server closes; (answer, seconds taken)."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=wait) as sock:
        start = time.monotonic()
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), time.monotonic() - start


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request" in t.name)


def wait_for_handlers(n: int, limit: float = 5.0) -> int:
    deadline = time.monotonic() + limit
    while handler_threads() > n and time.monotonic() < deadline:
        time.sleep(0.02)
    return handler_threads()


# ----------------------------------------------------------------------------------------------- auth ---
def test_api_key_is_required_and_checked(server, model_dir):
    ok = {"model": "m", "prompt": [5, 6], "max_tokens": 2}
    for key in (None, "wrong", KEY + "x", ""):
        status, answer = post(server, ok, key=key)
        assert status == 401 and "API key" in answer["error"]["message"]
        status, answer = request(server, "GET", "/v1/models", key=key)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
    status, answer = request(server, "GET", "/v1/models", headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert status == 401
    assert post(server, ok)[0] == 200
    assert request(server, "GET", "/v1/models")[0] == 200
    # the client sends its key; without one it fails at once (401 is not retried)
    engine = OpenAIEngine("m", base_url=server.url, tokenizer=model_dir, api_key=KEY, timeout=10)
    assert len(engine.generate([[5, 6]], max_tokens=2)) == 1
    anonymous = OpenAIEngine("m", base_url=server.url, tokenizer=model_dir, api_key="", timeout=10,
                             max_retries=3, backoff=0.01)
    with pytest.raises(OpenAIServerError, match="HTTP 401"):
        anonymous.generate([[5, 6]], max_tokens=2)
    assert anonymous.requests == 1


def test_no_key_configured_means_open(model_dir):
    with serve_hf(model_dir, device="cpu", request_timeout=TIMEOUT) as srv:
        assert request(srv, "GET", "/v1/models", key=None)[0] == 200
        assert request(srv, "GET", "/v1/models", key="anything")[0] == 200


# ---------------------------------------------------------------------------------- malformed bodies ---
BAD_BODIES = {
    "json list": b"[1, 2, 3]",
    "json string": b'"hello"',
    "json null": b"null",
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe\x00{",
    "deeply nested": b"[" * 20000 + b"]" * 20000,
    "no prompt": {"model": "m"},
    "empty prompt list": {"prompt": []},
    "empty token prompt": {"prompt": [[]]},
    "prompt a number": {"prompt": 5},
    "prompt a dict": {"prompt": {"a": 1}},
    "negative token id": {"prompt": [-1]},
    "negative token id batch": {"prompt": [[5, 6], [3, -7]]},
    "float token id": {"prompt": [5, 1.5]},
    "bool token id": {"prompt": [5, True]},
    "max_tokens negative": {"prompt": "x", "max_tokens": -1},
    "max_tokens zero": {"prompt": "x", "max_tokens": 0},
    "max_tokens huge": {"prompt": "x", "max_tokens": 10 ** 9},
    "max_tokens string": {"prompt": "x", "max_tokens": "5"},
    "max_tokens float": {"prompt": "x", "max_tokens": 2.5},
    "logprobs negative": {"prompt": "x", "logprobs": -1},
    "logprobs huge": {"prompt": "x", "logprobs": 10 ** 6},
    "logprobs string": {"prompt": "x", "logprobs": "3"},
    "temperature negative": {"prompt": "x", "temperature": -0.5},
    "temperature string": {"prompt": "x", "temperature": "hot"},
    "n two": {"prompt": "x", "n": 2},
    "n zero": {"prompt": "x", "n": 0},
    "n string": {"prompt": "x", "n": "many"},
    "stop a number": {"prompt": "x", "stop": 5},
    "stop list of numbers": {"prompt": "x", "stop": [1, 2]},
    "seed a string": {"prompt": "x", "seed": "abc"},
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_malformed_request_gets_a_400_json_answer(server, name):
    status, answer = post(server, BAD_BODIES[name])
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_temperature_is_refused(server, value):
    status, answer = post(server, b'{"prompt": "x", "temperature": %s}' % value.encode())
    assert status == 400 and "temperature" in answer["error"]["message"]


def test_token_ids_out_of_range_are_refused(server, vocab):
    status, answer = post(server, {"prompt": [5, vocab]})
    assert status == 400 and str(vocab) in answer["error"]["message"]
    assert post(server, {"prompt": [5, vocab - 1], "max_tokens": 1})[0] == 200
    assert post(server, {"prompt": [0, 5], "max_tokens": 1, "logprobs": 5, "temperature": 0})[0] == 200


def test_oversized_body_is_refused_without_reading_it(server):
    # the cap is 64 KiB; the headers claim far more and only a little follows
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{\"prompt\": ")
    answer, took = raw_exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error"' in answer and took < 5
    # a body just over the cap, sent in full
    status, answer = post(server, {"prompt": "x" * (64 * 1024)})
    assert status == 413 and "bytes" in answer["error"]["message"]


@pytest.mark.parametrize("length", [None, b"-5", b"abc"])
def test_missing_or_bad_content_length(server, length):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
    if length is not None:
        head += b"Content-Length: " + length + b"\r\n"
    answer, took = raw_exchange(server, head + b"\r\n")
    assert answer.split(b" ")[1] in (b"400", b"411"), answer[:200]
    assert b'"error"' in answer and took < 5


def test_body_shorter_than_content_length_times_out_and_frees_the_thread(server):
    before = wait_for_handlers(0)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": \"x\"")
    answer, took = raw_exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error"' in answer
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 5
    assert wait_for_handlers(before) <= before  # the handler thread has ended
    assert post(server, {"prompt": [5, 6], "max_tokens": 1})[0] == 200


def test_slow_drip_body_is_bounded_by_the_deadline(server):
    """A client dripping bytes (each within the socket timeout) still hits the whole-body deadline."""
    port = server.server_address[1]
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Length: 1000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(head)
        try:
            for _ in range(40):
                sock.sendall(b" ")
                time.sleep(TIMEOUT / 4)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408") or answer == b"", answer[:200]
    assert took < 40 * TIMEOUT / 4 + 5


def test_idle_keep_alive_connection_is_closed(server):
    answer, took = raw_exchange(server, b"")  # connect and say nothing
    assert answer == b"" and took < TIMEOUT + 5


def test_unexpected_exception_answers_500_and_keeps_serving(server, monkeypatch):
    def boom(request):
        raise RuntimeError("engine exploded\nsecond line")

    monkeypatch.setattr(server, "complete", boom)
    status, answer = post(server, {"prompt": [5, 6], "max_tokens": 1})
    assert status == 500 and "RuntimeError" in answer["error"]["message"]
    assert answer["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert post(server, {"prompt": [5, 6], "max_tokens": 1})[0] == 200


def test_a_keep_alive_connection_survives_a_400(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        for body, status in ((b"[1]", 400), (json.dumps({"prompt": [5], "max_tokens": 1}).encode(), 200),
                             (b'{"prompt": [-3]}', 400)):
            conn.request("POST", "/v1/completions", body=body, headers=headers)
            response = conn.getresponse()
            assert response.status == status and json.loads(response.read())
    finally:
        conn.close()


def test_main_takes_the_key_from_flag_or_environment(monkeypatch):
    seen = []

    class Stub:
        url = "http://127.0.0.1:1/v1"

        class thread:
            @staticmethod
            def join():
                return None

    def fake_serve(model, host, port, **kw):
        seen.append(kw)
        return Stub()

    monkeypatch.setattr(openai_server, "serve_hf", fake_serve)
    monkeypatch.setenv("RAYSAD_SERVER_API_KEY", "from-env")
    openai_server.main(["some/model"])
    openai_server.main(["some/model", "--api-key", "from-flag", "--request-timeout", "3"])
    monkeypatch.delenv("RAYSAD_SERVER_API_KEY")
    openai_server.main(["some/model"])
    assert [s["api_key"] for s in seen] == ["from-env", "from-flag", None]
    assert seen[1]["request_timeout"] == 3.0 and seen[0]["request_timeout"] == 10.0
    assert not math.isnan(seen[0]["request_timeout"])
