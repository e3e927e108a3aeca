"""The RLR node pack: V3 schemas over ``logic.py``. Imported only inside ComfyUI (or with a stand-in)."""

from __future__ import annotations

import dataclasses
import inspect
import logging

from comfy_api.latest import ComfyExtension, io

from rlr_backend.choices import ESTIMATOR_CHOICES, FLOW_STEP_CHOICES
from rlr_backend.estimators import ESTIMATORS, ZO_MODES
from rlr_backend.rewards import REWARD_HELP, REWARDS

from . import logic
from .folders import (NO_LORA, checkpoint_names, folder_list, lora_files, lora_path, register_folders,
                      save_roots)

logger = logging.getLogger(__name__)

CATEGORY = "RLR"
# V3 schema features newer ComfyUIs offer, used where this one has them (the pack supports >= 0.3.64)
_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else set()
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Int.Input.__init__).parameters else {}


def _schema(**kw) -> io.Schema:
    """io.Schema without the optional fields this ComfyUI lacks (search_aliases: ComfyUI >= 0.9)."""
    optional = {"search_aliases"}
    return io.Schema(**{k: v for k, v in kw.items() if k not in optional or k in _SCHEMA_FIELDS})
MODEL = io.Custom("RLR_MODEL")
REWARD = io.Custom("RLR_REWARD")
ESTIMATOR = io.Custom("RLR_ESTIMATOR")
PROMPTS = io.Custom("RLR_PROMPTS")
LORA = io.Custom("LORA_MODEL")  # the core socket: LoraModelLoader and SaveLoRA take it
BIG = 2**31 - 1


def _int(name: str, field: str | None = None, *, max: int = 10_000, default=None, tooltip: str | None = None,
         min: int | None = None, advanced: bool = False, **kw) -> io.Int.Input:
    spec = logic.config_field(field or name)
    lo = spec["min"] if min is None else min
    return io.Int.Input(name, default=spec["default"] if default is None else default,
                        min=lo if lo is not None else 0, max=max, tooltip=tooltip or spec["tooltip"],
                        **(ADVANCED if advanced else {}), **kw)


def _float(name: str, field: str | None = None, *, min: float = 0.0, max: float = 100.0, step: float = 0.01,
           default=None, tooltip: str | None = None, advanced: bool = False) -> io.Float.Input:
    spec = logic.config_field(field or name)
    return io.Float.Input(name, default=spec["default"] if default is None else default, min=min, max=max,
                          step=step, tooltip=tooltip or spec["tooltip"], **(ADVANCED if advanced else {}))


class LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="RLR_LoadModel", search_aliases=["load model for training", "rlr model", "embedded default", "reward fine-tuning model"],
            display_name="RLR Load Model", category=CATEGORY,
            description="A model for RLR training through diffusers: the tiny embedded default, a SD1.x/SD2.x/SDXL "
                        "diffusers folder from models/diffusers, or a single-file .safetensors checkpoint from "
                        "models/checkpoints (architecture read from the weights, offline).",
            inputs=[io.Combo.Input("model", options=logic.model_choices(folder_list("diffusers"),
                                                                        checkpoint_names()),
                                   default=logic.EMBEDDED,
                                   tooltip="the embedded default (32x32 coloured shapes, loads in a second), a "
                                           "folder in models/diffusers, or checkpoints/<file>.safetensors"),
                    io.Int.Input("image_size", default=0, min=0, max=2048, step=8, optional=True,
                                 tooltip="single-file checkpoints: training/sampling size in pixels (0: native, "
                                         "SD1.x 512, SDXL 1024); smaller trains faster")],
            outputs=[MODEL.Output(display_name="rlr_model", tooltip="a recipe that loads a fresh copy per run")])

    @classmethod
    def execute(cls, model: str, image_size: int = 0) -> io.NodeOutput:
        if model == logic.EMBEDDED:
            return io.NodeOutput(logic.DiffusersSource(None))
        if model.startswith(logic.CHECKPOINT_PREFIX):
            from rlr_backend.safe_io import check_safetensors

            path = logic.resolve_checkpoint(folder_list("checkpoints"), model[len(logic.CHECKPOINT_PREFIX):])
            check_safetensors(path)  # header only; the architecture is checked when it loads
            return io.NodeOutput(logic.DiffusersSource(str(path), image_size or None))
        if image_size:
            raise ValueError("RLR Load Model: image_size applies to single-file checkpoints; a diffusers folder's "
                             "config decides its size (set image_size to 0)")
        folder = logic.resolve_model_folder(folder_list("diffusers"), model)
        from rlr_backend.models.loader import check_pipeline_dir

        check_pipeline_dir(folder)  # SD1.x/SD2.x/SDXL diffusers folders
        return io.NodeOutput(logic.DiffusersSource(str(folder)))


class FromComfyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="RLR_FromComfyModel", search_aliases=["train checkpoint", "checkpoint to rlr", "lora training from checkpoint", "train model"],
            display_name="RLR From Comfy Model", category=CATEGORY,
            description="Train through the MODEL, CLIP and VAE of a Load Checkpoint node: SD1.x, SD2.x, SDXL UNets "
                        "(DDIM chain) or the flow-matching SD3/SD3.5, FLUX.1 and Z-Image (flow chain with the "
                        "MODEL's shift; set flow_step / flow_eta on RLR Trainer). The inputs are never modified: "
                        "training works on a clone with LoRA weight wrappers.",
            inputs=[io.Model.Input("model", tooltip="the diffusion model from Load Checkpoint or Load Diffusion "
                                                    "Model (SD1.x/SD2.x/SDXL, SD3/SD3.5, FLUX.1, Z-Image)"),
                    io.Clip.Input("clip", tooltip="the text encoder of the same checkpoint"),
                    io.Vae.Input("vae", tooltip="the VAE of the same checkpoint"),
                    io.Int.Input("width", default=512, min=64, max=2048, step=64,
                                 tooltip="image width used for training and sampling (smaller is faster; a "
                                         "multiple of 16 for flow models)"),
                    io.Int.Input("height", default=512, min=64, max=2048, step=64,
                                 tooltip="image height used for training and sampling")],
            outputs=[MODEL.Output(display_name="rlr_model")])

    @classmethod
    def execute(cls, model, clip, vae, width: int, height: int) -> io.NodeOutput:
        from .comfy_source import ComfySource

        return io.NodeOutput(ComfySource(model, clip, vae, width, height))


class Reward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        help_text = "; ".join(f"{k}: {v}" for k, v in REWARD_HELP.items())
        return _schema(
            node_id="RLR_Reward", search_aliases=["reward", "reward function", "score", "aesthetic", "brightness", "prompt alignment"],
            display_name="RLR Reward", category=CATEGORY,
            description="A reward from the backend's registry; chain nodes for a weighted sum.",
            inputs=[io.Combo.Input("reward", options=sorted(REWARDS), default="prompt_alignment", tooltip=help_text),
                    io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                                   tooltip="weight of this reward in the sum (negative to penalise)"),
                    REWARD.Input("add_to", optional=True, tooltip="rewards to add this one to (weighted sum)"),
                    io.String.Input("target", default="", optional=True,
                                    tooltip="position: left, right, top, bottom, center or X:Y in 0-1 (default "
                                            "left); size: the fraction of the image the shape should cover (default "
                                            "0.4); empty for the default; other rewards take none")],
            outputs=[REWARD.Output(display_name="reward")])

    @classmethod
    def execute(cls, reward: str, weight: float, add_to=None, target: str = "") -> io.NodeOutput:
        return io.NodeOutput(logic.add_reward(add_to, reward, weight, target))


class Estimator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        summary = "; ".join(f"{k}: {v.summary}" for k, v in sorted(ESTIMATORS.items()))
        return _schema(
            node_id="RLR_Estimator", search_aliases=["gradient estimator", "rlr", "ddpo", "policy gradient", "backprop", "optimizer"],
            display_name="RLR Estimator", category=CATEGORY,
            description="The gradient estimator: RLR (the paper) or a baseline, with its knobs.",
            inputs=[io.Combo.Input("estimator", options=list(ESTIMATOR_CHOICES), default=logic.config_field("estimator")["default"],
                                   tooltip=logic.config_field("estimator")["tooltip"] + "; " + summary),
                    _int("h", max=100), _int("fo_steps", max=100),
                    io.Combo.Input("zo_mode", options=list(ZO_MODES), default="latent_lr",
                                   tooltip=logic.config_field("zo_mode")["tooltip"], **ADVANCED),
                    _float("nu", min=1e-6, max=1.0, step=1e-4, advanced=True),
                    _int("truncation", max=100, min=1, advanced=True),
                    _int("chain_len", max=100, min=1, advanced=True),
                    io.Boolean.Input("step_baseline", default=logic.config_field("step_baseline")["default"],
                                     tooltip=logic.config_field("step_baseline")["tooltip"] + "; off: the paper's "
                                     "estimator", optional=True, **ADVANCED)],  # optional: older API graphs lack it
            outputs=[ESTIMATOR.Output(display_name="estimator")])

    @classmethod
    def execute(cls, estimator: str, h: int, fo_steps: int, zo_mode: str, nu: float, truncation: int,
                chain_len: int, step_baseline: bool = True) -> io.NodeOutput:
        return io.NodeOutput(logic.estimator_settings(estimator, h=h, fo_steps=fo_steps, zo_mode=zo_mode, nu=nu,
                                                      truncation=truncation, chain_len=chain_len,
                                                      step_baseline=bool(step_baseline)))


class PromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="RLR_PromptSchedule", search_aliases=["prompt", "training prompts", "prompt schedule", "chain of thought", "dcot"],
            display_name="RLR Prompt Schedule", category=CATEGORY,
            description="A training prompt with coarse / mid / fine versions for the early / middle / late "
                        "sampling steps (the paper's Diffusive Chain-of-Thought); chain nodes for more prompts.",
            inputs=[io.String.Input("fine", multiline=True, default="a red circle on a blue background",
                                    tooltip="the full prompt; the reward judges images against it. 'coarse | mid | "
                                            "fine' on one line also works"),
                    io.String.Input("coarse", default="", tooltip="prompt for the first steps (empty: the fine one)"),
                    io.String.Input("mid", default="", tooltip="prompt for the middle steps (empty: the fine one)"),
                    io.Float.Input("coarse_end", default=0.33, min=0.01, max=0.98, step=0.01,
                                   tooltip="fraction of the sampling steps that use the coarse prompt"),
                    io.Float.Input("mid_end", default=0.67, min=0.02, max=0.99, step=0.01,
                                   tooltip="fraction of the steps after which the fine prompt takes over"),
                    io.Int.Input("ho_start", default=0, min=0, max=1000,
                                 tooltip="RLR: lowest paper step j of the half-order sub-chain (1 = last step); "
                                         "0 and 0: uniform over the chain", **ADVANCED),
                    io.Int.Input("ho_end", default=0, min=0, max=1000,
                                 tooltip="RLR: highest paper step j of the half-order sub-chain", **ADVANCED),
                    PROMPTS.Input("add_to", optional=True, tooltip="prompts to add this one to")],
            outputs=[PROMPTS.Output(display_name="prompts")])

    @classmethod
    def execute(cls, fine: str, coarse: str, mid: str, coarse_end: float, mid_end: float, ho_start: int,
                ho_end: int, add_to=None) -> io.NodeOutput:
        return io.NodeOutput(logic.add_prompt(add_to, fine, coarse, mid, coarse_end, mid_end, ho_start, ho_end))


class Trainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="RLR_Trainer", search_aliases=["lora train", "train lora", "reward", "reward fine-tuning", "rl fine-tune", "rlhf", "ddpo", "training"],
            display_name="RLR Trainer", category=CATEGORY,
            description="Reward fine-tuning of a LoRA. Progress text and previews from the first model call, the "
                        "bar counts updates; Cancel stops within one denoising step and saves the LoRA of the last "
                        "finished update (loras/rlr/, or rlr_loras/ for the embedded default). The seed is fixed, so "
                        "queueing again with the same inputs reuses the trained LoRA.",
            inputs=[MODEL.Input("rlr_model", tooltip="from RLR Load Model or RLR From Comfy Model"),
                    REWARD.Input("reward", tooltip="from RLR Reward"),
                    PROMPTS.Input("prompts", tooltip="from RLR Prompt Schedule"),
                    ESTIMATOR.Input("estimator", optional=True, tooltip="from RLR Estimator (default: RLR)"),
                    _int("steps", max=100_000),
                    _float("lr", min=0.0, max=1.0, step=1e-5, default=0.0,
                           tooltip="Adam learning rate; 0: the rate the benchmark sweeps chose for the estimator "
                                   "(1e-3 for RLR with the step baseline on a differentiable reward, DDPO, and zo "
                                   "without the step baseline; 3e-3 for the others)"),
                    _int("lora_rank", max=256, advanced=True),
                    _int("seed", max=BIG, min=0, control_after_generate=False,
                         tooltip="seed of the run (sampling noise, prompt order, LoRA init); fixed, so the same "
                                 "inputs give the same LoRA and ComfyUI reuses it instead of training again"),
                    _int("batch_size", max=256), _int("images_per_prompt", max=256),
                    _int("num_inference_steps", max=1000), _float("guidance_scale", max=30.0, step=0.1),
                    _float("eta", max=1.0, step=0.05, advanced=True),
                    _int("preview_every", "eval_every", max=100_000, min=0, advanced=True,
                         tooltip="evaluate and show a preview every N updates (0: only at start and end)"),
                    io.String.Input("run_name", default="rlr", tooltip="name of the run folder in output/rlr_runs/ "
                                                                       "and of the partial LoRA if cancelled"),
                    _float("kl_weight", max=100.0, step=1e-4, advanced=True),
                    _float("early_stop_drop", max=100.0, step=0.01, advanced=True),
                    # flow-matching models (SD3/SD3.5, FLUX.1, Z-Image); last, so older workflows keep their values
                    io.Combo.Input("flow_step", options=list(FLOW_STEP_CHOICES),
                                   default=logic.config_field("flow_step")["default"],
                                   tooltip=logic.config_field("flow_step")["tooltip"], **ADVANCED),
                    _float("flow_eta", min=0.01, max=2.0, step=0.05, advanced=True),
                    io.Int.Input("sde_start", default=0, min=0, max=1000, tooltip="flow-matching models: first "
                                 "stochastic sampler step of the SDE window (0 = the first step)", **ADVANCED),
                    io.Int.Input("sde_size", default=0, min=0, max=1000, tooltip="flow-matching models: stochastic "
                                 "steps in the window, ODE steps elsewhere (Flow-GRPO-Fast, MixGRPO); 0: every "
                                 "step stochastic", **ADVANCED),
                    _int("best_recheck_seeds", max=1000, min=0, advanced=True)],
            outputs=[LORA.Output(display_name="lora", tooltip="LoRA (kohya keys; diffusers keys for flow models) (connect to RLR Save LoRA or "
                                                              "Load LoRA Model)"),
                     io.Image.Output(display_name="reward_curve", tooltip="batch and evaluation reward per update"),
                     io.Image.Output(display_name="before_after", tooltip="evaluation images before | after")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, rlr_model, reward, prompts, steps: int, lr: float, lora_rank: int, seed: int, batch_size: int,
                images_per_prompt: int, num_inference_steps: int, guidance_scale: float, eta: float,
                preview_every: int, run_name: str, estimator=None, kl_weight: float = 0.0,
                early_stop_drop: float = 0.0, flow_step: str = "flow_sde", flow_eta: float = 0.7, sde_start: int = 0,
                sde_size: int = 0, best_recheck_seeds: int = 8) -> io.NodeOutput:
        from . import comfy_glue

        out = comfy_glue.run_training(
            rlr_model, reward, prompts, estimator, node_id=cls.hidden.unique_id, run_name=run_name,
            options=dict(steps=steps, lr=lr or None, lora_rank=lora_rank, seed=seed, batch_size=batch_size,
                         images_per_prompt=images_per_prompt, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, eta=eta, eval_every=preview_every, kl_weight=kl_weight,
                         early_stop_drop=early_stop_drop, flow_step=flow_step, flow_eta=flow_eta,
                         sde_window=(sde_start, sde_size) if sde_size else None,
                         best_recheck_seeds=best_recheck_seeds))
        return io.NodeOutput(out.lora, out.curve, out.grid)


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="RLR_Sampler", search_aliases=["sample", "generate images", "lora preview", "before after", "ddim"],
            display_name="RLR Sampler", category=CATEGORY,
            description="Images from the model with an optional LoRA, for before/after comparisons (DDIM). A LoRA "
                        "whose header names another base model is refused.",
            inputs=[MODEL.Input("rlr_model", tooltip="from RLR Load Model or RLR From Comfy Model"),
                    io.String.Input("prompt", multiline=True, default="a red circle on a blue background",
                                    tooltip="the prompt"),
                    io.Int.Input("seed", default=0, min=0, max=BIG, control_after_generate=True, tooltip="seed of the initial noise"),
                    io.Int.Input("num_images", default=4, min=1, max=64, tooltip="images to generate"),
                    io.Int.Input("steps", default=20, min=2, max=1000, tooltip="DDIM steps"),
                    _float("guidance_scale", max=30.0, step=0.1),
                    _float("eta", max=1.0, step=0.05, advanced=True),
                    LORA.Input("lora", optional=True, tooltip="a LoRA from RLR Trainer (or any kohya LoRA)"),
                    io.Combo.Input("lora_file", options=[NO_LORA, *lora_files()], default=NO_LORA, optional=True,
                                   tooltip="or a LoRA file from models/loras or (embedded default) models/rlr_loras "
                                           "(.safetensors; used when no lora is connected); a LoRA made for "
                                           "another base model is refused"),
                    io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                                   tooltip="LoRA strength (0: the base model)")],
            outputs=[io.Image.Output(display_name="images")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, rlr_model, prompt: str, seed: int, num_images: int, steps: int, guidance_scale: float,
                eta: float, lora=None, strength: float = 1.0, lora_file: str = NO_LORA) -> io.NodeOutput:
        from . import comfy_glue

        if lora is None and lora_file not in (None, NO_LORA):
            lora = logic.read_lora(lora_path(lora_file))

        images = comfy_glue.run_sampling(rlr_model, prompt, node_id=cls.hidden.unique_id, lora=lora,
                                         strength=strength, seed=seed, num_images=num_images, num_steps=steps,
                                         guidance_scale=guidance_scale, eta=eta)
        return io.NodeOutput(images)


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema(
            node_id="RLR_SaveLoRA", search_aliases=["save lora", "export lora", "lora file", "write lora"],
            display_name="RLR Save LoRA", category=CATEGORY, is_output_node=True,
            description="Write the LoRA (kohya format) to models/loras/rlr/ so Load LoRA lists it; LoRAs of the "
                        "embedded default go to models/rlr_loras/ instead (only RLR Sampler lists them: they fit no "
                        "SD1.x/SDXL checkpoint).",
            inputs=[LORA.Input("lora", lazy=True, tooltip="from RLR Trainer"),
                    io.String.Input("filename", default="rlr_lora",
                                    tooltip="file name without folders; '.safetensors' is added"),
                    io.Boolean.Input("overwrite", default=False, tooltip="replace an existing file of that name")],
            outputs=[io.String.Output(display_name="lora_name", tooltip="the name Load LoRA lists, e.g. rlr/x.safetensors")])

    @classmethod
    def validate_inputs(cls, filename: str) -> bool | str:
        """A bad name is refused when the prompt is queued, before anything runs (one input named, so one
        line in the error panel)."""
        try:
            logic.lora_target(save_roots()[0], filename, overwrite=True)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def check_lazy_status(cls, filename: str, overwrite: bool, lora=None) -> list[str]:
        """Runs before the LoRA input is computed (ComfyUI starts with ready output nodes, and the lazy
        input makes this one ready): an existing file without overwrite fails before any training."""
        if lora is None:
            loras, embedded = save_roots()
            logic.lora_target(loras, filename, overwrite)
            logic.lora_target(embedded, filename, overwrite, subfolder="")
            return ["lora"]
        return []

    @classmethod
    def execute(cls, lora, filename: str, overwrite: bool) -> io.NodeOutput:
        embedded = logic.is_embedded_lora(lora)
        root = save_roots()[1 if embedded else 0]
        target = logic.lora_target(root, filename, overwrite, subfolder="" if embedded else logic.LORA_SUBFOLDER)
        logic.save_lora_file(lora, target)
        name = f"{logic.EMBEDDED_LORA_FOLDER}/{target.name}" if embedded else f"{logic.LORA_SUBFOLDER}/{target.name}"
        where = name if embedded else f"loras/{name}"
        return io.NodeOutput(name, ui={"text": [f"saved {where}"]})


NODES: list[type[io.ComfyNode]] = [LoadModel, FromComfyModel, Reward, Estimator, PromptSchedule, Trainer, Sampler,
                                   SaveLoRA]


class RLRExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_folders()  # also here: on_load is new in some versions
        return NODES
