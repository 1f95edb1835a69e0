"""The LLM decode alone, every peer on the same weights and the same workload: a prompt of P token ids, then N
greedy tokens with EOS ignored.

Peers: our runtime's cached LLM graph (`ort`), our PyTorch decoder as the pipeline drives it (`torch`),
transformers' `generate` (`reference`), onnxruntime-genai's model builder output at fp32 and int4 (`genai`), and
Optimum's ORTModelForCausalLM run from its own virtual environment (`optimum`).

Every peer is timed the same way, from the outside: a call that produces 1 token (prefill + one pick) and a call
that produces N; prefill = T(1), decode tokens/s = (N - 1) / (T(N) - T(1)). That includes each library's own
per-token overhead (sampling, cache handling, Python), which a user pays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .harness import RssSampler, summarize

GENAI_PRECISIONS = ("fp32", "int4")
OPTIMUM_REQUIREMENT = "optimum-onnx[onnxruntime]"
GENAI_BUILDER_REQUIREMENT = "transformers>=5"


class PeerSkipped(RuntimeError):
    """A peer that cannot run on this machine; the message says why and is reported instead of numbers."""


def default_cache() -> Path:
    return Path(os.environ.get("OPENS2S_EDGE_CACHE", Path.home() / ".cache" / "opens2s-edge"))


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt: the content does not change the cost, only the length does."""
    return np.random.default_rng(seed).integers(0, vocab_size, length).tolist()


def time_decode(generate: Callable[[int], list[int]], n_new: int, runs: int, warmup: int) -> dict[str, Any]:
    """T(1) and T(N) repeated; the decode rate from their medians, and per run against the median T(1)."""
    for _ in range(warmup):
        generate(1)
        generate(n_new)
    one, full, produced = [], [], []
    with RssSampler() as rss:
        for _ in range(runs):
            t0 = time.perf_counter()
            generate(1)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ids = generate(n_new)
            full.append(time.perf_counter() - t0)
            produced.append(len(ids))
    t1 = float(np.median(one))
    per_run = [(n_new - 1) / (t - t1) for t in full if t > t1]
    tn = float(np.median(full))
    return {"prefill_s": summarize(one), "turn_s": summarize(full), "tokens_produced": produced,
            "decode_tok_s": (n_new - 1) / (tn - t1) if tn > t1 else None, "decode_tok_s_runs": summarize(per_run),
            "memory": {"decode_peak_rss_bytes": rss.peak}}


# -- a Hugging Face Qwen3 folder from our checkpoint's LLM --------------------------------------------------------
def checkpoint_key(checkpoint: Path) -> str:
    """Identifies a checkpoint's weights for the build caches: path, sizes and modification times."""
    from opens2s_edge.training.checkpoint import weight_files

    h = hashlib.sha256(str(checkpoint.resolve()).encode())
    for f in weight_files(checkpoint):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def write_hf_llm(checkpoint: Path, out: Path) -> Path:
    """The LLM of an OpenS2S checkpoint as a plain Qwen3ForCausalLM folder (config, safetensors, tokenizer),
    what the model builders of onnxruntime-genai and Optimum read. Written once per checkpoint."""
    from safetensors.torch import save_file

    from opens2s_edge.runtime.files import atomic_dir
    from opens2s_edge.training.checkpoint import TOKENIZER_FILES, read_state_dict

    if (out / "config.json").is_file():
        return out
    raw = json.loads((checkpoint / "config.json").read_text())["llm_config"]
    config = {**raw, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "float32"}
    prefix = "llm_model."
    state = {k[len(prefix):]: v.contiguous() for k, v in read_state_dict(checkpoint).items() if k.startswith(prefix)}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            shutil.copyfile(checkpoint / name, tmp / name)
    return out


# -- ours -------------------------------------------------------------------------------------------------------
def greedy_decode(decoder: Any, ids: list[int]) -> Callable[[int], list[int]]:
    """`generate(n)`: n greedy tokens after prefilling `ids` into a fresh sequence of one of our KV decoders (any
    backend's `KVDecoder`), the loop every "ours" peer times."""

    def generate(n: int) -> list[int]:
        decoder.reset()
        logits = decoder.run(decoder.embed(ids))["logits"]
        out = []
        for i in range(n):
            out.append(int(np.argmax(logits)))
            if i + 1 < n:
                logits = decoder.feed_token(out[-1])["logits"]
        return out

    return generate


def runtime_llm(config: dict, backend_name: str) -> dict[str, Any]:
    """Our runtime's LLM decoder alone, on onnxruntime (`ort`) or on the bundle's TensorRT engine (`trt`)."""
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.engine import make_backend
    from opens2s_edge.runtime.onnx_backend import BackendError

    bundle = load_bundle(config["bundle"], verify=False)
    t0 = time.perf_counter()
    try:
        backend = make_backend(backend_name, bundle, config["providers"], config["threads"])
    except BackendError as exc:
        if backend_name == "onnxruntime":
            raise
        raise PeerSkipped(str(exc)) from exc
    decoder = backend.decoder("llm", bundle.array("llm_embed"))
    load_s = time.perf_counter() - t0
    generate = greedy_decode(decoder, config["prompt_ids"])

    return {"load_s": load_s, "precision": bundle.manifest["dtype"], "backend": backend.describe(),
            **time_decode(generate, config["new_tokens"], config["runs"], config["warmup"])}


def ort_llm(config: dict) -> dict[str, Any]:
    return runtime_llm(config, "onnxruntime")


def trt_llm(config: dict) -> dict[str, Any]:
    return runtime_llm(config, "tensorrt")


def torch_llm(config: dict) -> dict[str, Any]:
    """Our PyTorch backend's LLM decoder alone, driven like `runtime_llm` drives the bundle's."""
    import torch

    from opens2s_edge.training.checkpoint import load_checkpoint
    from opens2s_edge.training.torch_backend import TorchBackend

    from .peers import _on_gpu

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    # On a GPU: bf16 with the decode step replayed as a CUDA graph, as `generate --device cuda` runs it.
    device = torch.device("cuda" if _on_gpu(config) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_checkpoint(config["checkpoint"], dtype=dtype, device=device)
    backend = TorchBackend(model, len(config["prompt_ids"]) + config["new_tokens"] + 1,
                           "graph" if device.type == "cuda" else "eager")
    decoder = backend.decoder("llm")
    load_s = time.perf_counter() - t0
    generate = torch.inference_mode()(greedy_decode(decoder, config["prompt_ids"]))

    return {"load_s": load_s, "precision": "bf16" if device.type == "cuda" else "fp32", "device": str(device),
            "torch_threads": torch.get_num_threads(),
            **time_decode(generate, config["new_tokens"], config["runs"], config["warmup"])}


def reference_llm(config: dict) -> dict[str, Any]:
    import torch
    import transformers

    from opens2s_edge.training.checkpoint import load_checkpoint

    from .peers import _on_gpu, hf_causal_lm

    transformers.logging.set_verbosity_error()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device("cuda" if _on_gpu(config) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    ours = load_checkpoint(config["checkpoint"], dtype=dtype, device=device)
    model = hf_causal_lm(ours.config.raw["llm_config"], ours.llm_model.state_dict()).to(device)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([config["prompt_ids"]], device=device)

    @torch.inference_mode()
    def generate(n: int) -> list[int]:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    return {"load_s": load_s, "precision": "bf16" if device.type == "cuda" else "fp32", "device": str(device),
            "transformers": transformers.__version__,
            **time_decode(generate, config["new_tokens"], config["runs"], config["warmup"])}


# -- onnxruntime-genai -----------------------------------------------------------------------------------------
def build_genai(python: Path, hf_dir: Path, out: Path, precision: str, log: Path) -> Path:
    """Run onnxruntime-genai's model builder on the HF folder (once per checkpoint and precision)."""
    if (out / "genai_config.json").is_file():
        return out
    from opens2s_edge.runtime.files import atomic_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(tmp / "_build_cache")]
        with open(log, "w") as f:
            # Run from the output folder, not the caller's: `python -m` puts the working directory first on sys.path,
            # and from a source checkout this project's top-level `kernels/` would shadow the `kernels` package
            # transformers imports (it did: ImportError CUDAProperties).
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, cwd=tmp)
        if proc.returncode != 0:
            tail = log.read_text()[-1500:]
            raise PeerSkipped(f"onnxruntime-genai's builder failed on this model ({precision}): {tail}")
        shutil.rmtree(tmp / "_build_cache", ignore_errors=True)
    return out


def genai_llm(config: dict) -> dict[str, Any]:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise PeerSkipped("onnxruntime-genai is not installed (pip install 'opens2s-edge[bench]')") from exc
    precision = config["precision"]
    cache = Path(config["cache"])
    hf_dir = write_hf_llm(Path(config["checkpoint"]), cache / "hf-llm")
    t0 = time.perf_counter()
    # The builder imports model classes of newer transformers than the project pins (onnxruntime-genai 0.18
    # imports Qwen3_5ForConditionalGeneration): it runs from a side venv; the built model runs here.
    python = side_venv(Path(config["cache_root"]), "genai-builder-venv", [GENAI_BUILDER_REQUIREMENT],
                       cache / "genai-builder-venv.log")
    model_dir = build_genai(python, hf_dir, cache / f"genai-{precision}", precision, cache / f"genai-{precision}.log")
    build_s = time.perf_counter() - t0
    genai_config = json.loads((model_dir / "genai_config.json").read_text())
    session = genai_config["model"]["decoder"].setdefault("session_options", {})
    if config["threads"]:
        session["intra_op_num_threads"] = config["threads"]
        (model_dir / "genai_config.json").write_text(json.dumps(genai_config, indent=4))
    t0 = time.perf_counter()
    model = og.Model(str(model_dir))
    load_s = time.perf_counter() - t0
    ids = config["prompt_ids"]

    def generate(n: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, np.int32))
        out = [int(gen.get_next_tokens()[0])]
        while len(out) < n and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    return {"build_s": build_s, "load_s": load_s, "precision": precision, "onnxruntime_genai": og.__version__,
            **time_decode(generate, config["new_tokens"], config["runs"], config["warmup"])}


# -- side environments -----------------------------------------------------------------------------------------
def side_venv(cache_root: Path, name: str, requirements: list[str], log: Path) -> Path:
    """A virtual environment for a peer's tool whose pins clash with the project's, created on first use.

    The venv sees the project environment's packages through a .pth line appended after its own site-packages:
    what pip installs into the venv wins (e.g. a transformers the tool needs), and torch is not downloaded again.
    Returns the venv's python; raises PeerSkipped if it cannot be created (no network to the package index).
    """
    import sysconfig

    venv = cache_root / name
    python = venv / "bin" / "python"
    marker = venv / ".opens2s-edge-ready"
    wanted = "\n".join(requirements) + "\n"
    if marker.is_file() and marker.read_text() == wanted:
        return python
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if not python.is_file():
            proc = subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                                  stdout=f, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                raise PeerSkipped(f"could not create a virtual environment in {venv}: {log.read_text()[-800:]}")
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "zz_opens2s_edge_project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], stdout=f,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise PeerSkipped(f"could not install {' '.join(requirements)} into {venv} (offline?): "
                          f"{log.read_text()[-800:]}")
    marker.write_text(wanted)
    return python


def optimum_llm(config: dict) -> dict[str, Any]:
    cache = Path(config["cache"])
    cache.mkdir(parents=True, exist_ok=True)
    hf_dir = write_hf_llm(Path(config["checkpoint"]), cache / "hf-llm")
    # optimum-onnx pins transformers<4.58: it never goes into the project environment.
    python = side_venv(Path(config["cache_root"]), "optimum-venv", [OPTIMUM_REQUIREMENT], cache / "optimum-venv.log")
    worker = Path(__file__).with_name("optimum_worker.py")
    request = {"hf_dir": str(hf_dir), "onnx_dir": str(cache / "optimum-onnx"), "prompt_ids": config["prompt_ids"],
               "new_tokens": config["new_tokens"], "runs": config["runs"], "warmup": config["warmup"],
               "threads": config["threads"]}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with RssSampler():
        proc = subprocess.run([str(python), str(worker), json.dumps(request)], capture_output=True, text=True,
                              env=env, check=False)
    if proc.returncode != 0:
        raise PeerSkipped(f"Optimum's ORTModelForCausalLM failed on this model: {proc.stderr[-1500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, full = result.pop("one"), result.pop("full")
    t1, tn = float(np.median(one)), float(np.median(full))
    n = config["new_tokens"]
    result.update({"prefill_s": summarize(one), "turn_s": summarize(full),
                   "decode_tok_s": (n - 1) / (tn - t1) if tn > t1 else None,
                   "decode_tok_s_runs": summarize([(n - 1) / (t - t1) for t in full if t > t1])})
    # The model ran in the worker process: its peak RSS is the worker's, reported by the worker itself.
    result["memory"] = {"peak_rss_bytes": result.pop("peak_rss_bytes")}
    return result


LLM_PEERS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "ort": ort_llm, "trt": trt_llm, "torch": torch_llm, "reference": reference_llm, "genai": genai_llm,
    "optimum": optimum_llm,
}
