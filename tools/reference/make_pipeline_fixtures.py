#!/usr/bin/env python3
"""Tiny but complete diffusers text-to-image pipelines and the images diffusers makes with them.

Writes, under --out (default Tests/Fixtures/pipelines):
  sd1/    StableDiffusionPipeline: tiny UNet, VAE and CLIPTextModel (quick_gelu, legacy eos id), the small CLIP
          tokenizer of Tests/Fixtures/tokenizers/clip_small, SD1.5's PNDM scheduler config
  sd2/    StableDiffusionPipeline as SD2.x: gelu text encoder padding with "!", linear projections, per-block
          heads, upcast attention, SD2.1's v-prediction DDIM scheduler config
  sdxl/   StableDiffusionXLPipeline: two tiny CLIP encoders (the second with a projection) and tokenizers
          (the second pads with "!" as SDXL's does), SDXL's EulerDiscrete scheduler config
  <pipeline>_text_encoders.safetensors  transformers' outputs of each text encoder of the folder on a few
          prompts (metadata `prompts`): `<encoder>.input_ids`, `.last_hidden_state`, `.text_embeds` (projection)
  cases.json  per case: the pipeline, prompt, negative prompt (or null), steps, guidance, seed, width,
          height, batch, scheduler (pea's name or null for the folder's own) and the image file
  <case>.safetensors  `images` [N, H, W, 3] as int32 values 0…255: diffusers' output_type="np" images
          converted as its PIL path does, (x · 255).round()
Everything runs in float32 on the CPU with torch.Generator("cpu").manual_seed(seed), as `pea generate` promises
to match.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "tokenizers")


def perturb(model, seed):
    # Move every parameter off its initial value (zero-initialised output convolutions included), so the
    # images depend on every layer.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def tiny_vae():
    torch.manual_seed(1)
    return perturb(AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 sample_size=32), 11)


def text_encoder(cls, hidden, vocab, eos, act, projection=None, seed=0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act=act, eos_token_id=eos,
                            bos_token_id=vocab - 2, pad_token_id=1, projection_dim=projection or 512)
    return perturb(cls(config), seed + 100)


def sd1_pipeline():
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TOKENIZERS, "clip_small"))
    vocab = len(tokenizer)
    torch.manual_seed(2)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 12)
    encoder = text_encoder(CLIPTextModel, 16, vocab, eos=2, act="quick_gelu", seed=3)
    # SD1.5's scheduler_config.json
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sd2_pipeline():
    # SD2.x: OpenCLIP-style text encoder (gelu, pads with "!"), linear projections, per-block heads, upcast
    # attention, v-prediction with SD2.1's DDIM scheduler config.
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TOKENIZERS, "clip_small_pad0"))
    vocab = len(tokenizer)
    torch.manual_seed(7)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=24,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 17)
    encoder = text_encoder(CLIPTextModel, 24, vocab, eos=vocab - 1, act="gelu", seed=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_pipeline():
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(TOKENIZERS, "clip_small"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(TOKENIZERS, "clip_small_pad0"))
    vocab = len(tokenizer)
    torch.manual_seed(4)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
        attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8), 14)
    encoder = text_encoder(CLIPTextModel, 16, vocab, eos=vocab - 1, act="quick_gelu", seed=5)
    encoder_2 = text_encoder(CLIPTextModelWithProjection, 16, vocab, eos=vocab - 1, act="gelu", projection=16, seed=6)
    # SDXL base's scheduler_config.json
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, interpolation_type="linear", prediction_type="epsilon",
                                       steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)


SCHEDULERS = {
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler-a": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "dpmpp-2m": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2,
                                                                 use_karras_sigmas=False),
    "dpmpp-2m-karras": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++",
                                                                        solver_order=2, use_karras_sigmas=True),
    "pndm": lambda c: PNDMScheduler.from_config(c),
}

CASES = [
    # name, pipeline, prompt, negative, steps, guidance, seed, width, height, batch, scheduler
    ("sd1_pndm", "sd1", "a red fox in the snow, photo", None, 4, 7.5, 42, 32, 24, 1, None),
    ("sd1_euler_a_negative_batch", "sd1", "an astronaut riding a horse", "blurry, low quality", 5, 6.0, 7, 24, 32, 2, "euler-a"),
    ("sd1_dpmpp_karras_no_guidance", "sd1", "mountains at dawn", None, 6, 1.0, 3, 32, 32, 1, "dpmpp-2m-karras"),
    ("sd1_ddim_long_prompt", "sd1", " ".join(["a very detailed painting of a lighthouse"] * 12), "", 3, 5.0, 1234, 16, 16, 1, "ddim"),
    ("sd2_ddim_v_prediction", "sd2", "a cabin in the woods!", None, 4, 7.5, 5, 24, 40, 1, None),
    ("sd2_euler_v_prediction", "sd2", "a cabin in the woods!", "fog", 3, 4.0, 6, 32, 24, 1, "euler"),
    ("sdxl_euler_zero_negative", "sdxl", "a cat wearing sunglasses", None, 4, 5.0, 0, 32, 24, 1, None),
    ("sdxl_dpmpp_negative", "sdxl", "a watercolor city skyline", "dark", 4, 7.0, 99, 24, 24, 2, "dpmpp-2m"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/pipelines")
    args = parser.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    pipelines = {"sd1": sd1_pipeline(), "sd2": sd2_pipeline(), "sdxl": sdxl_pipeline()}
    for name, pipe in pipelines.items():
        folder = os.path.join(args.out, name)
        pipe.save_pretrained(folder, safe_serialization=True)
        # transformers 5 saves a tokenizer as tokenizer.json only; published SD folders carry the slow
        # tokenizer's files (vocab.json, merges.txt, …), so the folders get those, as the hub has them.
        tokenizer_source = "clip_small_pad0" if name == "sd2" else "clip_small"
        for sub, source in (("tokenizer", tokenizer_source), ("tokenizer_2", "clip_small_pad0")):
            if os.path.isdir(os.path.join(folder, sub)):
                shutil.rmtree(os.path.join(folder, sub))
                shutil.copytree(os.path.join(TOKENIZERS, source), os.path.join(folder, sub))
    # `pea eval text-encoder` references: each pipeline's text encoders on a few prompts, as transformers runs
    # them from the saved folders (ids padded to 77 with the folder's tokenizer, outputs of the encoder).
    prompts = ["a red fox in the snow, photo", "", "Two cats!! 3 dogs & a very long tail " * 6]
    for which in pipelines:
        tensors = {}
        for encoder_dir, tokenizer_dir, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                                                ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
            folder = os.path.join(args.out, which)
            if not os.path.isdir(os.path.join(folder, encoder_dir)):
                continue
            tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, tokenizer_dir))
            encoder = cls.from_pretrained(os.path.join(folder, encoder_dir)).eval()
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            with torch.no_grad():
                out = encoder(ids)
            tensors[f"{encoder_dir}.input_ids"] = ids.to(torch.int64)
            tensors[f"{encoder_dir}.last_hidden_state"] = out.last_hidden_state
            if cls is CLIPTextModelWithProjection:
                tensors[f"{encoder_dir}.text_embeds"] = out.text_embeds
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, which + "_text_encoders.safetensors"),
                  metadata={"prompts": json.dumps(prompts, ensure_ascii=False)})

    records = []
    for name, which, prompt, negative, steps, guidance, seed, width, height, batch, scheduler in CASES:
        # Load what was saved, as a user's folder would be; swap the scheduler as diffusers users do.
        cls = StableDiffusionXLPipeline if which == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_pretrained(os.path.join(args.out, which))
        pipe.set_progress_bar_config(disable=True)
        if scheduler is not None:
            pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        with torch.no_grad():
            images = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                          width=width, height=height, num_images_per_prompt=batch, output_type="np",
                          generator=torch.Generator("cpu").manual_seed(seed)).images
        pixels = (images * 255).round().astype(np.int32)  # diffusers' numpy_to_pil
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "prompt": prompt, "negative_prompt": negative, "steps": steps,
                        "guidance": guidance, "seed": seed, "width": width, "height": height, "batch": batch,
                        "scheduler": scheduler, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(records)} cases and {len(pipelines)} pipelines ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
