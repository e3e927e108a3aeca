"""A flow model from ComfyUI's single files -> a diffusers pipeline, offline.

ComfyUI users keep a flow model as separate files: the transformer in ``models/diffusion_models``
(``flux1-dev.safetensors``, ``sd3.5_medium.safetensors``, ``z_image_turbo_bf16.safetensors``), the text
encoders in ``models/text_encoders`` (``clip_l``, ``clip_g``, ``t5xxl_fp16``, ``qwen_3_4b``) and the VAE in
``models/vae`` (``ae.safetensors``). They are named one by one (the command line: ``--model TRANSFORMER
--text-encoder FILE --text-encoder FILE --vae FILE --tokenizer DIR``); nothing is searched for:

* the transformer's architecture (:mod:`rlr_backend.models.flow_transformer_file`) says which encoders it
  takes: SD3 / SD3.5 CLIP-L + CLIP-G (+ T5, optional: without it diffusers pads with zeros), FLUX.1 CLIP-L + T5,
  Z-Image Qwen3; each encoder file's kind is read from its keys (:mod:`rlr_backend.models.flow_component_files`),
  so their order does not matter;
* the VAE file is required, unless the transformer file carries one (SD3 / SD3.5 checkpoints with
  ``first_stage_model.*``);
* the widths must fit together: CLIP projections summing to the transformer's pooled width, the T5 / Qwen3 width
  to its text width, the VAE's latent channels to its input; a mismatch is one line naming both files;
* tokenizers: CLIP-L and CLIP-G use the CLIP BPE vocabulary shipped with the embedded default model. T5 and
  Qwen3 tokenizers cannot be shipped (their vocabularies are not ours to redistribute), so ``--tokenizer DIR``
  names a folder transformers reads offline: ComfyUI's own ``ComfyUI/comfy/text_encoders/t5_tokenizer`` or
  ``qwen25_tokenizer`` (Qwen3 uses the same vocabulary), or a diffusers folder's ``tokenizer_2`` / ``tokenizer``.
  Z-Image prompts are wrapped in Qwen3's chat format (``<|im_start|>user ... <|im_start|>assistant``), as
  ComfyUI and diffusers do, whatever template the folder carries.

The scheduler is the family's (SD3 and Z-Image: static shift 3; FLUX.1-dev: dynamic shift 0.5-1.15 over 256-4096
tokens; schnell: static shift 1). Every key and shape is checked on the headers before any data is read,
then each tensor is read and cast on its own (:mod:`rlr_backend.models.weights`), as the other loaders do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..safe_io import InvalidModelFile
from .flow_component_files import ComponentFile, mark_clip_roles, read_text_encoder, read_vae, refuse_scaled
from .flow_transformer_file import TransformerSpec, resolve_transformer
from .single_file import UnsupportedCheckpoint, _Part, _traced
from .weights import check_memory, empty_weights, header_tensors, tensor_bytes

logger = logging.getLogger(__name__)

#: family -> (pipeline class, text encoders it needs (role -> how many), optional roles)
FAMILY_ENCODERS = {"sd3": ("StableDiffusion3Pipeline", {"clip": 2, "t5": 1}, ("t5",)),
                   "flux": ("FluxPipeline", {"clip": 1, "t5": 1}, ()),
                   "zimage": ("ZImagePipeline", {"qwen3": 1}, ())}
ENCODER_NAMES = {"clip": "CLIP", "t5": "T5 (t5xxl)", "qwen3": "Qwen3 (qwen_3_4b)"}
#: Qwen3's chat format for one user turn, as Z-Image is prompted (ComfyUI ``z_image.py``; diffusers with the
#: Qwen3 tokenizer's template and ``enable_thinking=True``)
ZIMAGE_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _safetensors(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    if p.suffix.lower() != ".safetensors":
        raise InvalidModelFile(f"{what} {p}: only .safetensors files are read (no pickles)")
    return p


def _encoders(spec: TransformerSpec, files: list[ComponentFile], source: Path) -> dict[str, list[ComponentFile]]:
    """The given encoder files sorted by kind and checked against what ``spec``'s family takes."""
    _, wanted, optional = FAMILY_ENCODERS[spec.family]
    by_kind: dict[str, list[ComponentFile]] = {k: [] for k in wanted}
    for f in files:
        if f.kind not in wanted:
            raise UnsupportedCheckpoint(f"{f.path}: a {ENCODER_NAMES[f.kind]} text encoder; {spec.name} takes "
                                        f"{_takes(wanted, optional)}")
        by_kind[f.kind].append(f)
    given = ", ".join(f.path.name for f in files) or "none"
    for kind, n in wanted.items():
        have = len(by_kind[kind])
        if have > n or (have < n and kind not in optional):
            raise UnsupportedCheckpoint(f"{source}: {spec.name} takes {_takes(wanted, optional)} (--text-encoder "
                                        f"FILE, repeated); given: {given} ({have} {ENCODER_NAMES[kind]})")
    return by_kind


def _takes(wanted: dict, optional: tuple) -> str:
    return " + ".join(f"{n if n > 1 else 'one'} {ENCODER_NAMES[k]}{' (optional)' if k in optional else ''}"
                      for k, n in wanted.items())


def _check_widths(spec: TransformerSpec, enc: dict[str, list[ComponentFile]], vae: ComponentFile) -> None:
    """The encoders' and the VAE's widths must be the ones the transformer was trained with."""
    cfg, name = spec.config, spec.name

    def refuse(what: ComponentFile, text: str) -> None:
        raise UnsupportedCheckpoint(f"{what.path}: {text}; {name} needs another file (the files are of different "
                                    "models)")
    latent = cfg["in_channels"] // 4 if spec.family == "flux" else cfg["in_channels"]
    if vae.config["latent_channels"] != latent:
        refuse(vae, f"the VAE has {vae.config['latent_channels']} latent channels, the transformer takes {latent}")
    clips = enc.get("clip", [])
    if spec.family == "sd3":
        pooled = sum(c.config.projection_dim for c in clips)
        if pooled != cfg["pooled_projection_dim"]:
            refuse(clips[-1], f"the CLIP encoders' pooled widths sum to {pooled}, the transformer takes "
                              f"{cfg['pooled_projection_dim']}")
    elif spec.family == "flux" and clips[0].width != cfg["pooled_projection_dim"]:
        refuse(clips[0], f"the CLIP encoder is {clips[0].width} wide, the transformer's pooled input "
                         f"{cfg['pooled_projection_dim']}")
    text_width = cfg.get("joint_attention_dim", cfg.get("cap_feat_dim"))
    for f in enc.get("t5", []) + enc.get("qwen3", []):
        if f.width != text_width:
            refuse(f, f"the {f.role} encoder is {f.width} wide, the transformer's text input {text_width}")


def _tokenizer(kind: str, folder: str | Path | None, encoder: ComponentFile, family: str):
    """The tokenizer of a T5 or Qwen3 encoder, read offline from ``folder``; its vocabulary must fit the encoder."""
    from transformers import AutoTokenizer

    if folder is None:
        where = "ComfyUI/comfy/text_encoders/t5_tokenizer" if kind == "t5" else \
            "ComfyUI/comfy/text_encoders/qwen25_tokenizer"
        raise FileNotFoundError(f"{encoder.path}: the {encoder.role} text encoder needs its tokenizer: --tokenizer DIR "
                                f"(e.g. {where}, or a diffusers folder's tokenizer folder); none is shipped")
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer folder {d} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers raises many types for a folder it cannot read
        raise ValueError(f"tokenizer folder {d} cannot be read offline ({type(e).__name__}: {str(e)[:200]})") from e
    if len(tok) > encoder.config.vocab_size:
        raise UnsupportedCheckpoint(f"tokenizer folder {d} has {len(tok)} tokens, the {encoder.role} encoder "
                                    f"{encoder.path.name} only {encoder.config.vocab_size}: another model's tokenizer")
    if family == "zimage":
        tok.chat_template = ZIMAGE_CHAT_TEMPLATE
    return tok


def _clip_tokenizer(c: ComponentFile):
    from .single_file import _tokenizer

    return _tokenizer("openclip" if c.role == "CLIP-G" else "clip", c.config.max_position_embeddings)


def _scheduler(spec: TransformerSpec):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if spec.family == "flux":
        dev = spec.config["guidance_embeds"]
        return FlowMatchEulerDiscreteScheduler(shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5,
                                               max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def load_flow_single_file(path: str | Path, *, text_encoders=(), vae: str | Path | None = None,
                          tokenizer: str | Path | None = None, dtype: torch.dtype = torch.float32,
                          text_encoder_dtype: torch.dtype | None = None, image_size: int | None = None):
    """The diffusers pipeline (StableDiffusion3Pipeline, FluxPipeline or ZImagePipeline) of a transformer file
    ``path`` with its ``text_encoders`` files, ``vae`` file and ``tokenizer`` folder (see the module docstring):
    transformer and VAE in ``dtype``, text encoders in ``text_encoder_dtype`` (default ``dtype``). Raises
    FileNotFoundError, InvalidModelFile / UnsupportedCheckpoint (one line naming the file) or NotEnoughMemory."""
    import diffusers

    p = _safetensors(path, "transformer file")
    text_dtype = text_encoder_dtype or dtype
    shapes = header_tensors(p)
    refuse_scaled(shapes, str(p))
    spec = resolve_transformer(shapes, str(p))
    enc_files = []
    for f in text_encoders:
        f = _safetensors(f, "text encoder file")
        enc_files.append(read_text_encoder(header_tensors(f), f))
    enc = _encoders(spec, enc_files, p)
    mark_clip_roles(enc.get("clip", []))
    for c in enc.get("clip", []):
        c.with_projection = spec.family == "sd3"
    size = image_size or 1024
    if vae is not None:
        vf = _safetensors(vae, "VAE file")
        vae_file = read_vae(header_tensors(vf), vf, spec.family, size)
    elif any(k.startswith("first_stage_model.") for k in shapes):
        vae_file = read_vae(shapes, p, spec.family, size)
    else:
        raise FileNotFoundError(f"{p}: {spec.name} needs its VAE file (--vae FILE, e.g. ae.safetensors from ComfyUI's "
                                "models/vae); the transformer file has none")
    _check_widths(spec, enc, vae_file)

    cls = getattr(diffusers, spec.class_name)
    with empty_weights():
        transformer = cls.from_config(spec.config)
        modules = {"vae": vae_file.build()}
        ordered = [(role, f) for role in ("clip", "t5", "qwen3") for f in sorted(enc.get(role, []), key=lambda c: c.width)]
        for _, f in ordered:
            modules[f.role] = f.build()
    parts = [(_Part("transformer", transformer, "", spec.convert, dtype, expected=spec.name), p, shapes),
             (_Part("VAE", modules["vae"], vae_file.prefix, vae_file.convert, dtype, expected="a VAE of " + spec.name),
              vae_file.path, header_tensors(vae_file.path) if vae_file.path != p else shapes)]
    for _, f in ordered:
        parts.append((_Part(f"{f.role} text encoder", modules[f.role], f.prefix, f.convert, text_dtype,
                            expected=f"a {f.role} text encoder", fp32_keys=("wo",) if f.kind == "t5" else ()),
                      f.path, header_tensors(f.path)))
    sources = [part.check(_traced(sh), str(fp)) for part, fp, sh in parts]
    needed = sum(tensor_bytes((sh[k] for k in set(src.values())), lambda t, d=part.dtype: d)
                 for (part, _, sh), src in zip(parts, sources))
    check_memory(needed, f"{p.name} ({spec.name} with its encoders and VAE, {needed / 1e9:.1f} GB of weights)")
    for (part, fp, _), src in zip(parts, sources):
        part.load(fp, src)
        part.module.eval()  # built in training mode: T5's dropout would be on

    kw: dict = dict(transformer=transformer, vae=modules["vae"], scheduler=_scheduler(spec))
    if spec.family in ("sd3", "flux"):
        clips = sorted(enc["clip"], key=lambda c: c.width)
        kw.update(text_encoder=modules["CLIP-L"], tokenizer=_clip_tokenizer(clips[0]))
        t5 = enc["t5"][0] if enc["t5"] else None
        t5_tok = _tokenizer("t5", tokenizer, t5, spec.family) if t5 else None
        if spec.family == "sd3":
            kw.update(text_encoder_2=modules["CLIP-G"], tokenizer_2=_clip_tokenizer(clips[1]),
                      text_encoder_3=modules.get("T5"), tokenizer_3=t5_tok)
        else:
            kw.update(text_encoder_2=modules["T5"], tokenizer_2=t5_tok)
    else:
        q = enc["qwen3"][0]
        kw.update(text_encoder=modules["Qwen3"], tokenizer=_tokenizer("qwen3", tokenizer, q, spec.family))
    pipe = getattr(diffusers, FAMILY_ENCODERS[spec.family][0])(**kw)
    pipe.set_progress_bar_config(disable=True)
    pipe.rlr_defaults = {}  # the adapters' own defaults, as for the model's diffusers folder
    pipe.rlr_image_size = image_size
    logger.info("loaded %s from %s (+ %s; transformer/VAE %s, text encoders %s)", spec.name, p,
                ", ".join(f.path.name for _, f in ordered) + ("" if vae_file.path == p else f", {vae_file.path.name}"),
                str(dtype).split(".")[-1], str(text_dtype).split(".")[-1])
    return pipe
