"""The MemLong adapter: what trains, how LoRA is attached, and the adapter file format.

What trains (MemLong's stage 2). Layers 0..mem_layer-1 are frozen, and so is everything in the memory
layer that produces stored K/V (its input norm, k_proj and v_proj): stored memory then never goes stale.
The memory layer is itself a retrieval layer in the default settings (15 in (15, 19, 23, 27)): it reads
memory through its own q_proj and writes through o_proj, neither of which affects stored K/V, so by
default (`mem_layer_qo=True`) those two get LoRA and its post-attention norm trains. Without that the
lowest retrieval layer could never learn to use memory. Above the memory layer: LoRA on q, k, v, o and
both RMSNorms; the final norm trains too. MLPs, embeddings and the (tied) LM head stay frozen.

Format: a directory with `adapter.safetensors` and `adapter.json`.
- tensors: `<module>.lora_A` (r, in), `<module>.lora_B` (out, r) for every LoRA target, and the full
  weight of every trained norm under its parameter name (e.g. `model.layers.20.input_layernorm.weight`).
- json: format, r, alpha, targets, norms, the MemLong settings trained with, the base model identity,
  and free-form training facts.
Loading for inference merges W += (alpha / r) * B @ A into the base weights: no peft at inference time
and no extra cost per token.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memlong.atomic import write_atomic
from memlong.errors import InvalidArgument, ModelUnavailable
from memlong.model import MemLongModel

log = logging.getLogger(__name__)

FORMAT = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
# MemLong settings an adapter is tied to: a model with other values would read memory it was not trained on.
# Adapters are trained in the paper layout (an adapter written before layouts were recorded is one).
_BINDING = ("layout", "mem_layer", "ret_attn_layers", "mem_position")


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of an adapter: LoRA rank/scale and which modules and norms it covers."""

    r: int
    alpha: float
    lora_targets: tuple[str, ...]
    norms: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def for_model(cls, model: MemLongModel, r: int = 16, alpha: float = 32.0, mem_layer_qo: bool = True):
        if model.config.layout != "paper":
            raise InvalidArgument(
                "layout", "stage-2 training teaches the paper layout; per-layer memory needs no adapter"
            )
        m, n = model.config.mem_layer, model.n_layers
        targets: list[str] = []
        norms: list[str] = []
        if mem_layer_qo:
            targets += [f"model.layers.{m}.self_attn.{p}" for p in ("q_proj", "o_proj")]
            norms.append(f"model.layers.{m}.post_attention_layernorm.weight")
        for i in range(m + 1, n):
            targets += [f"model.layers.{i}.self_attn.{p}" for p in PROJ]
            norms += [f"model.layers.{i}.{k}.weight" for k in ("input_layernorm", "post_attention_layernorm")]
        norms.append("model.norm.weight")
        if r <= 0 or alpha <= 0:
            raise InvalidArgument("lora_r", "LoRA rank and alpha must be positive")
        return cls(r=r, alpha=float(alpha), lora_targets=tuple(targets), norms=tuple(norms))


def base_identity(model: MemLongModel) -> dict:
    """What an adapter is bound to: architecture sizes and a hash of weights it must not be moved onto."""
    h = hashlib.sha256()
    base = model.base
    for t in (base.embed_tokens.weight, _base_linear(base.layers[model.config.mem_layer].self_attn.k_proj)):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    cfg = model.hf.config
    return {
        "architecture": type(model.hf).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "fingerprint": h.hexdigest()[:24],
    }


def _base_linear(module: torch.nn.Module) -> torch.Tensor:
    """The frozen weight of a Linear, whether or not peft wrapped it."""
    return getattr(module, "base_layer", module).weight


def attach_lora(model: MemLongModel, spec: AdapterSpec) -> list[tuple[str, torch.nn.Parameter]]:
    """Inject LoRA modules (B = 0, so outputs are unchanged) and make exactly the adapter trainable.

    Returns the trainable (name, parameter) pairs in a fixed order: the adapter's tensor names.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(spec.lora_targets)
    )
    inject_adapter_in_model(cfg, model.hf)
    model._hook_k_proj()  # k_proj modules were replaced: capture keys from the LoRA-wrapped modules
    for p in model.hf.parameters():
        p.requires_grad_(False)
    return trainable_parameters(model, spec, set_grad=True)


def trainable_parameters(
    model: MemLongModel, spec: AdapterSpec, set_grad: bool = False
) -> list[tuple[str, torch.nn.Parameter]]:
    out: list[tuple[str, torch.nn.Parameter]] = []
    for name in spec.lora_targets:
        mod = model.hf.get_submodule(name)
        out.append((f"{name}.lora_A", mod.lora_A["default"].weight))
        out.append((f"{name}.lora_B", mod.lora_B["default"].weight))
    for name in spec.norms:
        out.append((name, model.hf.get_parameter(name)))
    if set_grad:
        for _, p in out:
            p.requires_grad_(True)
    return out


def adapter_tensors(model: MemLongModel, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone().contiguous() for name, p in trainable_parameters(model, spec)}


def save_adapter(path: Path, model: MemLongModel, spec: AdapterSpec, extra: dict | None = None) -> None:
    """Write adapter.safetensors + adapter.json into directory `path` (each file atomically)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        **asdict(spec),
        "memlong": {
            **model.config.__dict__,
            "ret_attn_layers": list(model.config.ret_attn_layers),
        },
        "base_model": base_identity(model),
        **(extra or {}),
    }
    tensors = adapter_tensors(model, spec)
    write_atomic(
        path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": str(FORMAT)})
    )
    write_atomic(path / ADAPTER_META, json.dumps(meta, indent=1) + "\n")


def read_adapter(path: Path) -> tuple[AdapterSpec, dict, dict[str, torch.Tensor]]:
    """(spec, metadata, tensors) of an adapter directory; raises ModelUnavailable when unreadable."""
    try:
        meta = json.loads((path / ADAPTER_META).read_text())
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read the adapter in {path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ModelUnavailable(f"{path}: adapter format {meta.get('format')!r}, expected {FORMAT}")
    spec = AdapterSpec(
        r=int(meta["r"]),
        alpha=float(meta["alpha"]),
        lora_targets=tuple(meta["lora_targets"]),
        norms=tuple(meta["norms"]),
    )
    want = {f"{t}.{ab}" for t in spec.lora_targets for ab in ("lora_A", "lora_B")} | set(spec.norms)
    if set(tensors) != want:
        raise ModelUnavailable(f"{path}: adapter tensors do not match its adapter.json")
    return spec, meta, tensors


def check_binding(model: MemLongModel, meta: dict, path: Path, check_base: bool = True) -> None:
    """Refuse an adapter trained for another base model or other memory/retrieval layers."""
    trained = meta.get("memlong", {})
    for key in _BINDING:
        have = getattr(model.config, key)
        want = trained.get(key, "paper" if key == "layout" else None)
        if key == "ret_attn_layers":
            have, want = list(have), list(want or [])
        if want is not None and have != want:
            raise InvalidArgument(key, f"adapter {path} was trained with {key}={want}, the model uses {have}")
    if check_base and meta.get("base_model", {}).get("fingerprint") != base_identity(model)["fingerprint"]:
        raise InvalidArgument("adapter", f"adapter {path} was trained on another base model")
    for key in ("local_window", "chunk", "top_k", "sink_tokens"):
        if key in trained and trained[key] != getattr(model.config, key):
            log.warning(
                "adapter %s was trained with %s=%s; the model runs with %s",
                path,
                key,
                trained[key],
                getattr(model.config, key),
            )


@torch.no_grad()
def merge_adapter(model: MemLongModel, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Fold LoRA into the base Linear weights and copy the trained norms (in place)."""
    for name in spec.lora_targets:
        weight = _base_linear(model.hf.get_submodule(name))
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]  # (r, in), (out, r)
        weight += (spec.scale * (b.float() @ a.float())).to(weight.dtype)
    for name in spec.norms:
        model.hf.get_parameter(name).copy_(tensors[name])


@torch.no_grad()
def copy_into_lora(model: MemLongModel, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into already attached LoRA modules (resuming training)."""
    for name, p in trainable_parameters(model, spec):
        p.copy_(tensors[name])
