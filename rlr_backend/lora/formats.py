"""LoRA files as users have them -> the modules of a UNet (and text encoders) they adapt.

Accepted (names are resolved against the model itself, so a LoRA for another architecture is refused):

* **kohya / sd-scripts**: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
  ``<module>`` is a diffusers module path with ``_`` for ``.``
  (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``, what rlr-train writes) or
  the original SD / SGM path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``: most
  SDXL LoRAs, and SD1.x LoRAs from sd-scripts' SDXL-era code). Text encoders: ``lora_te_`` (SD1.x/SD2.x),
  ``lora_te1_`` / ``lora_te2_`` (SDXL's two).
* **diffusers / PEFT**: ``unet.<module>.lora_A.weight`` (``transformer.<module>`` or ComfyUI's
  ``diffusion_model.<module>`` for a flow transformer) / ``.lora_B.weight`` (also with
  ``base_model.model.`` or no prefix, and diffusers' older ``.lora.down.weight`` / ``.lora.up.weight``
  and attention-processor ``to_q_lora.down.weight`` forms); text encoders ``text_encoder.`` /
  ``text_encoder_2.``. Alpha comes from diffusers' ``lora_adapter_metadata`` header (``lora_alpha``,
  ``alpha_pattern``) or a ``.alpha`` tensor, else it is the rank (scale 1), as diffusers and PEFT assume.

Ranks and alphas may differ between modules. Anything else (LyCORIS LoHa/LoKr, DoRA, full-weight
diffs) is refused with one line naming the key found and the formats expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..safe_io import InvalidModelFile, nonfinite_count

KOHYA_PREFIXES: dict[str, str] = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                                  "lora_te2_": "text_encoder_2"}
KOHYA_PARTS: dict[str, str] = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
#: dotted (diffusers/PEFT) key prefixes -> the model they adapt
DOTTED_PREFIXES: dict[str, str] = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                                   "base_model.model.": "unet", "transformer.": "unet", "diffusion_model.": "unet",
                                   "": "unet"}
DOTTED_PARTS: dict[str, str] = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                                ".lora.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up",
                                ".alpha": "alpha"}
#: suffixes of formats that are not plain LoRA, and what they are
OTHER_FORMATS: dict[str, str] = {
    "hada_w1_a": "LyCORIS LoHa", "hada_w2_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lokr_w2": "LyCORIS LoKr",
    "lokr_w1_a": "LyCORIS LoKr", "lora_mid.weight": "LyCORIS LoCon with a CP-decomposed middle (lora_mid)",
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".diff": "a full-weight difference", ".diff_b":
    "a full-weight difference", "w_norm": "a norm-layer difference", "b_norm": "a norm-layer difference",
    "oft_blocks": "OFT", "oft_diag": "OFT", "lora_B.bias": "LoRA with biases",
}
EXPECTED = ("kohya 'lora_unet_<module>.lora_down.weight' / '.lora_up.weight' / '.alpha' (diffusers or SD/SGM module "
            "names; 'lora_te_', 'lora_te1_', 'lora_te2_' for text encoders) or diffusers/PEFT "
            "'unet.<module>.lora_A.weight' / '.lora_B.weight' ('text_encoder.', 'text_encoder_2.')")

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


@dataclass
class LoraModule:
    """One adapted module: its path in the target model, its down (A) / up (B) weights and alpha, and the
    file keys they came from (for messages)."""

    target: str
    module: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def sgm_unet_names(config) -> dict[str, str]:
    """diffusers module prefix -> (original SD / SGM module prefix, renames inside it) for a UNet2DConditionModel
    config. SGM numbers the layers consecutively: ``input_blocks.0`` is conv_in, each down-block layer is one
    input block (resnet ``.0``, attention ``.1``), each downsampler one more; up blocks have one layer more, and
    a block's upsampler joins its last output block (after the attention, if any)."""
    rules: dict[str, tuple[str, dict[str, str]]] = {
        "conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}), "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _RESNET), "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _RESNET)}
    n = len(config.block_out_channels)
    per = config.layers_per_block
    layers = list(per) if isinstance(per, (list, tuple)) else [per] * n
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            rules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _RESNET)
            rules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if i < n - 1:
            rules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    k = 0
    for i, kind in enumerate(config.up_block_types):
        for j in range(layers[n - 1 - i] + 1):
            rules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _RESNET)
            rules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
            k += 1
        if i < n - 1:
            rules[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k - 1}.{2 if 'CrossAttn' in kind else 1}.conv",
                                                         {})
    return rules


def _sgm_name(name: str, rules: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in rules:
            new, inner = rules[prefix]
            rest = parts[cut:]
            if rest and rest[0] in inner:
                rest = inner[rest[0]].split(".") + rest[1:]
            return ".".join([new, *rest])
    return None


def module_names(model: torch.nn.Module, target: str) -> dict[str, str]:
    """Every name a LoRA may give a module of ``model`` (with ``_`` or ``.``) -> its path. The UNet also
    answers to its SD/SGM names; a CLIP text model to names with and without ``text_model.`` (transformers
    >= 5.6 dropped that level)."""
    out: dict[str, str] = {}
    rules = sgm_unet_names(model.config) if target == "unet" and hasattr(model, "config") and \
        hasattr(model.config, "block_out_channels") else None
    for name, _ in model.named_modules():
        if not name:
            continue
        aliases = {name}
        if rules is not None:
            sgm = _sgm_name(name, rules)
            if sgm:
                aliases.add(sgm)
        if target != "unet":
            aliases.add(name.removeprefix("text_model.") if name.startswith("text_model.") else "text_model." + name)
        for alias in aliases:
            out.setdefault(alias, name)
            out.setdefault(alias.replace(".", "_"), name)
    return out


def _other_format(key: str) -> str | None:
    for marker, what in OTHER_FORMATS.items():
        if key.endswith(marker) or f".{marker}." in key:
            return what
    return None


def _split_key(key: str) -> tuple[str, str, str]:
    """(target model, module name as written, part) of a LoRA key; InvalidModelFile naming it otherwise."""
    for prefix, target in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, part in KOHYA_PARTS.items():
                if key.endswith(suffix):
                    return target, key[len(prefix):-len(suffix)], part
            break
    else:
        for suffix, part in DOTTED_PARTS.items():
            if key.endswith(suffix):
                body = key[:-len(suffix)]
                for prefix, target in DOTTED_PREFIXES.items():
                    if body.startswith(prefix):
                        name = body[len(prefix):]
                        if suffix.startswith("_lora."):  # attention processor: attn1.processor.to_q_lora
                            name = name.replace(".processor.", ".")
                            name = name + ".0" if name.endswith("to_out") else name
                        return target, name, part
    raise InvalidModelFile("")  # replaced by the caller's message


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, models: dict[str, torch.nn.Module],
               source: str, arch_hint: str = "") -> dict[str, dict[str, LoraModule]]:
    """target ("unet", "text_encoder", "text_encoder_2") -> module path -> LoraModule, every name resolved in
    ``models`` and every shape checked; nothing is changed. Keys of a target that is not in ``models`` are
    grouped under it unresolved (the caller decides to skip them). Raises InvalidModelFile with one line."""
    groups: dict[tuple[str, str], LoraModule] = {}
    for key, value in tensors.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            kind = value.dtype if torch.is_tensor(value) else type(value).__name__
            raise InvalidModelFile(f"{source}: tensor {key!r} is {kind}, not a floating-point tensor")
        other = _other_format(key)
        if other:
            raise InvalidModelFile(f"{source}: {other} is not supported (key {key!r}); expected a LoRA in {EXPECTED}")
        try:
            target, name, part = _split_key(key)
        except InvalidModelFile:
            raise InvalidModelFile(f"{source}: unknown LoRA format (key {key!r}); expected {EXPECTED}") from None
        bad = nonfinite_count(value)
        if bad:
            raise InvalidModelFile(f"{source}: tensor {key!r} holds {bad} NaN/inf values; the LoRA is damaged")
        m = groups.setdefault((target, name), LoraModule(target, name))
        m.keys.append(key)
        if part == "alpha":
            if value.numel() != 1:
                raise InvalidModelFile(f"{source}: {key!r} should hold one number (the alpha), has shape "
                                       f"{list(value.shape)}")
            m.alpha = float(value)
        else:
            setattr(m, part, value)
    if not groups:
        raise InvalidModelFile(f"{source}: the file holds no tensors; expected a LoRA in {EXPECTED}")
    meta_alpha, alpha_pattern = _metadata_alphas(metadata)
    out: dict[str, dict[str, LoraModule]] = {}
    names = {t: module_names(m, t) for t, m in models.items()}
    for (target, name), m in groups.items():
        if m.down is None or m.up is None:
            raise InvalidModelFile(f"{source}: LoRA module {name!r} lacks its {'down (A)' if m.down is None else 'up (B)'}"
                                   f" weight (keys: {', '.join(m.keys)})")
        if target not in models:
            out.setdefault(target, {})[name] = m
            continue
        path = names[target].get(name)
        if path is None:
            what = "UNet" if target == "unet" else target.replace("_", " ")
            raise InvalidModelFile(f"{source}: LoRA module {name!r} (key {m.keys[0]!r}) does not exist in this {what}"
                                   f"{arch_hint}")
        m.module = path
        if m.alpha is None:
            m.alpha = alpha_pattern.get(path, meta_alpha.get(target)) or float(m.rank)
        _check_shapes(m, models[target].get_submodule(path), source, arch_hint)
        if path in out.get(target, {}):
            raise InvalidModelFile(f"{source}: two LoRA entries adapt the same module {path!r} ({m.keys[0]!r} and "
                                   f"{out[target][path].keys[0]!r})")
        out.setdefault(target, {})[path] = m
    return out


def _metadata_alphas(metadata: dict[str, str] | None) -> tuple[dict[str, float], dict[str, float]]:
    """(target -> lora_alpha, module -> alpha) from diffusers' ``lora_adapter_metadata`` header."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}, {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}, {}
    alphas, pattern = {}, {}
    for key, value in meta.items() if isinstance(meta, dict) else ():
        target, _, field_name = key.rpartition(".") if "." in key else ("unet", "", key)
        if field_name == "lora_alpha" and isinstance(value, (int, float)):
            alphas[target or "unet"] = float(value)
        elif field_name == "alpha_pattern" and isinstance(value, dict):
            pattern.update({k: float(v) for k, v in value.items() if isinstance(v, (int, float))})
    return alphas, pattern


def _check_shapes(m: LoraModule, layer: torch.nn.Module, source: str, arch_hint: str) -> None:
    down, up = m.down, m.up
    if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
        raise InvalidModelFile(f"{source}: LoRA module {m.keys[0].rsplit('.', 2)[0]!r} has mismatched shapes: up "
                               f"{list(up.shape)}, down {list(down.shape)}")
    w = getattr(layer, "weight", None)
    if w is None or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        raise InvalidModelFile(f"{source}: LoRA module {m.module!r} is a {type(layer).__name__}, not a linear or "
                               "convolution layer; cannot adapt it")
    if up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel():
        raise InvalidModelFile(f"{source}: LoRA module {m.module!r} (key {m.keys[0]!r}) has shape {tuple(up.shape)} x "
                               f"{tuple(down.shape)} but the layer is {tuple(w.shape)}{arch_hint}")


def lora_config(modules: dict[str, LoraModule]):
    """The peft LoraConfig that adds these modules (per-module ranks and alphas as patterns when they differ)."""
    from peft import LoraConfig

    ranks = [m.rank for m in modules.values()]
    alphas = [m.alpha for m in modules.values()]
    r, a = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    return LoraConfig(r=r, lora_alpha=a, target_modules=sorted(modules), init_lora_weights=False,
                      rank_pattern={p: m.rank for p, m in modules.items() if m.rank != r},
                      alpha_pattern={p: m.alpha for p, m in modules.items() if m.alpha != a})
