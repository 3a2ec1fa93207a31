#!/usr/bin/env python3
"""Scheduler reference fixtures for Pea, computed by diffusers' own schedulers.

A case is a model folder's `scheduler_config.json` (published SD1.5, SD2.1-v and SDXL ones, and made-up ones
that reach the other config paths) and the scheduler a user picks for it: a `pea generate --scheduler` name,
built the way diffusers users switch schedulers, `Target.from_config(pipe.scheduler.config, **overrides)`,
or none, meaning the folder's own `_class_name`. Each case is one file `<out>/<case>.safetensors` holding

  - a timestep table: for every N of the metadata `table_steps`, `set_timesteps(N)`'s `timesteps` (int64 or
    float32, as diffusers holds them), `sigmas` (schedulers that have them) and `init_noise_sigma`, each
    concatenated over N in `table.timesteps`, `table.sigmas`, `table.init_noise_sigma`, with the lengths in
    `table.lengths`; `refused_steps` lists the N for which diffusers' set_timesteps raised;
  - for every N of `loop_steps`, a denoising loop run exactly as diffusers' pipelines run it, on a [1,4,3,5]
    latent, with a "model" that is a fixed function of its input and timestep:
        model(x, t) = 0.3 * x + (0.1 * cos(t / 100)) * fixed
    `N<n>.initial` (the starting latents, already multiplied by init_noise_sigma), `N<n>.model_input.<i>`
    (scale_model_input's result, only where it is not the identity), `N<n>.prev_sample.<i>` (every step's
    output), and `N<n>.noise.<i>` for every step at which the scheduler drew noise from the generator, the
    very tensor it drew (read back by replaying the generator), so that Pea can feed the same noise.
    `fixed` is the model's constant tensor.

Metadata: `config` (the folder's scheduler_config.json as JSON), `name` (the picked name, "" for the
folder's own class), `class` (the diffusers class that ran), `table_steps`, `refused_steps`, `loop_steps`,
`eta` (DDIM's step argument; 0 unless the case sets it), and the diffusers and torch versions.

`ddpm_<case>.safetensors`: DDPMScheduler (built from a folder's config as training code builds it) on a batch
of 4 with one timestep per sample: `original`, `noise`, `timesteps` (int64), `out.noisy` = add_noise,
`out.velocity` = get_velocity, and `alphas_cumprod` (the float32 table every scheduler shares).

Everything runs in float32 as diffusers runs it (its tables are float32 tensors). Inputs are seeded, so a
rerun writes the same files.

Run through `make fixtures`, or:
    python tools/reference/make_scheduler_fixtures.py --out Tests/Fixtures/schedulers
"""
import argparse
import inspect
import json
import math
import os
import struct

import torch
import diffusers
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save

diffusers.utils.logging.set_verbosity_error()

# scheduler_config.json of real model folders, verbatim.
SD15 = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21V = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
# Made-up folders for the config paths the published ones do not take.
ZERO_SNR_TRAILING = {  # the "common diffusion noise schedules are flawed" recipe: zero terminal SNR, trailing, v
    "_class_name": "DDIMScheduler", "beta_schedule": "linear", "timestep_spacing": "trailing",
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "clip_sample": False,
    "set_alpha_to_one": False,
}
COSINE_X0 = {  # cosine betas, linspace spacing, x0 prediction, clipping (DDIM's clip_sample defaults to true)
    "_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace",
    "prediction_type": "sample", "set_alpha_to_one": True, "clip_sample_range": 0.3,
}
PNDM_PRK = {  # PNDM with its Runge-Kutta warm-up (skip_prk_steps defaults to false)
    "_class_name": "PNDMScheduler", "beta_schedule": "linear",
}
DPM_ORDER3 = {
    "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "solver_order": 3, "timestep_spacing": "leading", "steps_offset": 1,
}
DPM_HEUN_SIGMA_MIN = {  # heun 2M, last sigma sigma_min (then no forced first-order last step), clipped lambdas
    "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "solver_type": "heun",
    "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing", "lambda_min_clipped": -5.1,
    "prediction_type": "v_prediction",
}
EULER_KARRAS = {  # Karras sigmas in Euler, a configured sigma range, sigma_min as the last sigma
    "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing",
    "sigma_min": 0.05, "sigma_max": 10.0,
}
SMALL_TRAINED = {  # 100 training steps and explicit betas
    "_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 100,
    "trained_betas": [round(0.001 + 0.3 * (i / 99) ** 2, 6) for i in range(100)], "timestep_spacing": "leading",
    "steps_offset": 1, "prediction_type": "v_prediction",
}

# pea generate --scheduler NAME → the diffusers class and the from_config overrides that the name implies.
NAMES = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "use_karras_sigmas": False}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                      "use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {}),
}
CLASSES = {cls.__name__: cls for cls in (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                                         EulerDiscreteScheduler, PNDMScheduler)}

TABLE_STEPS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 15, 20, 50]
SHORT, LONG = [4, 7], [4, 7, 25]

# (case, folder config, name or None, loop step counts, extra step arguments)
CASES = [
    ("sd15_pndm", SD15, None, LONG, {}),
    ("sd15_ddim", SD15, "ddim", SHORT, {}),
    ("sd15_ddim_eta", SD15, "ddim", [7], {"eta": 0.5}),
    ("sd15_euler", SD15, "euler", SHORT, {}),
    ("sd15_euler_a", SD15, "euler-a", SHORT, {}),
    ("sd15_dpmpp_2m", SD15, "dpmpp-2m", SHORT, {}),
    ("sd15_dpmpp_2m_karras", SD15, "dpmpp-2m-karras", LONG, {}),
    ("sd21v_ddim", SD21V, None, SHORT, {}),
    ("sd21v_euler", SD21V, "euler", SHORT, {}),
    ("sd21v_dpmpp_2m", SD21V, "dpmpp-2m", SHORT, {}),
    ("sdxl_euler", SDXL, None, LONG, {}),
    ("sdxl_euler_a", SDXL, "euler-a", SHORT, {}),
    ("sdxl_pndm", SDXL, "pndm", [7], {}),
    ("zsnr_ddim", ZERO_SNR_TRAILING, None, SHORT, {}),
    ("zsnr_euler", ZERO_SNR_TRAILING, "euler", SHORT, {}),
    ("zsnr_dpmpp_2m", ZERO_SNR_TRAILING, "dpmpp-2m", SHORT, {}),
    ("cosine_x0_ddim", COSINE_X0, None, SHORT, {}),
    ("cosine_x0_euler", COSINE_X0, "euler", SHORT, {}),
    ("cosine_x0_dpmpp_2m", COSINE_X0, "dpmpp-2m", SHORT, {}),
    # Timesteps only: with cosine betas, Karras timesteps are truncated, not rounded, and the first ones repeat
    # (998, 998, …), so diffusers' own loop starts at the second of them and runs off the end of its sigmas.
    ("cosine_x0_dpmpp_2m_karras", COSINE_X0, "dpmpp-2m-karras", [], {}),
    ("pndm_prk", PNDM_PRK, None, [4, 10], {}),
    ("dpm_order3", DPM_ORDER3, None, [7, 20], {}),
    ("dpm_heun_sigma_min", DPM_HEUN_SIGMA_MIN, None, SHORT, {}),
    ("euler_karras", EULER_KARRAS, None, SHORT, {}),
    ("small_trained_euler_a", SMALL_TRAINED, None, [7], {}),
    ("small_trained_dpmpp_2m_karras", SMALL_TRAINED, "dpmpp-2m-karras", [7], {}),
]

DDPM_CASES = [
    ("ddpm_sd15", SD15, [0, 999, 500, 17]),
    ("ddpm_zsnr", ZERO_SNR_TRAILING, [999, 0, 1, 640]),
    ("ddpm_cosine", COSINE_X0, [250, 998, 3, 999]),
]

SHAPE = (1, 4, 3, 5)


def build(folder, name):
    """The scheduler a diffusers user gets: the folder's class from its config, then (when a name is picked)
    the target class from that scheduler's config, with the name's overrides."""
    base = CLASSES[folder["_class_name"]].from_config(dict(folder))
    if name is None:
        return base
    cls, overrides = NAMES[name]
    return cls.from_config(base.config, **overrides)


def model(x, t, fixed):
    return 0.3 * x + (0.1 * math.cos(float(t) / 100.0)) * fixed


def table(scheduler):
    """set_timesteps(N) for every N of TABLE_STEPS; the N that diffusers refuses (PNDM's Runge-Kutta warm-up
    needs N ≥ 4) are returned apart."""
    timesteps, sigmas, lengths, init, steps, refused = [], [], [], [], [], []
    for n in TABLE_STEPS:
        try:
            scheduler.set_timesteps(n)
        except ValueError:
            refused.append(n)
            continue
        steps.append(n)
        timesteps.append(scheduler.timesteps.clone())
        lengths.append(len(scheduler.timesteps))
        if hasattr(scheduler, "sigmas"):
            sigmas.append(scheduler.sigmas.to(torch.float32).clone())
        init.append(float(scheduler.init_noise_sigma))
    out = {
        "table.timesteps": torch.cat(timesteps),
        "table.lengths": torch.tensor(lengths, dtype=torch.int64),
        "table.init_noise_sigma": torch.tensor(init, dtype=torch.float32),
    }
    if sigmas:
        out["table.sigmas"] = torch.cat(sigmas)
    return out, steps, refused


def loop(scheduler, n, fixed, seed, extra):
    """diffusers' StableDiffusionPipeline denoising loop, with `model` as the UNet and no guidance."""
    out = {}
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(n)
    latents = randn_tensor(SHAPE, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    out[f"N{n}.initial"] = latents.clone()
    # As the pipelines' prepare_extra_step_kwargs: the generator (and eta) only to a step that takes them.
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {k: v for k, v in {"generator": generator, **extra}.items() if k in accepted}
    assert set(extra) <= set(step_kwargs), f"{type(scheduler).__name__}.step does not take {extra}"
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        if not torch.equal(model_input, latents):
            out[f"N{n}.model_input.{i}"] = model_input.clone()
        model_output = model(model_input, t, fixed)
        before = generator.get_state()
        latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        after = generator.get_state()
        if not torch.equal(before, after):
            # The step drew noise: replay the generator to read what it drew.
            generator.set_state(before)
            drawn = randn_tensor(SHAPE, generator=generator, dtype=torch.float32)
            assert torch.equal(generator.get_state(), after), "the step drew something else than one randn"
            out[f"N{n}.noise.{i}"] = drawn
        out[f"N{n}.prev_sample.{i}"] = latents.clone()
    return out


def save_reproducible(tensors, path, metadata):
    """save_file with the metadata in sorted order (safetensors writes it in hash order), so that a rerun
    rewrites the same bytes; only the header's length, padded to 8 with spaces, changes."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + n:])


def versions():
    return {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    fixed = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234), dtype=torch.float32)
    for index, (case, folder, name, loop_steps, extra) in enumerate(CASES):
        scheduler = build(folder, name)
        tensors = {"fixed": fixed}
        timestep_table, table_steps, refused_steps = table(scheduler)
        tensors.update(timestep_table)
        for n in loop_steps:
            tensors.update(loop(scheduler, n, fixed, seed=100 * index + n, extra=extra))
        metadata = {
            "config": json.dumps(folder, sort_keys=True),
            "name": name or "",
            "class": type(scheduler).__name__,
            "table_steps": json.dumps(table_steps),
            "refused_steps": json.dumps(refused_steps),
            "loop_steps": json.dumps(loop_steps),
            "eta": json.dumps(extra.get("eta", 0.0)),
            **versions(),
        }
        save_reproducible(tensors, os.path.join(args.out, case + ".safetensors"), metadata)

    for index, (case, folder, timesteps) in enumerate(DDPM_CASES):
        scheduler = DDPMScheduler.from_config(dict(folder))
        generator = torch.Generator().manual_seed(9000 + index)
        shape = (len(timesteps),) + SHAPE[1:]
        original = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        t = torch.tensor(timesteps, dtype=torch.int64)
        tensors = {
            "original": original, "noise": noise, "timesteps": t,
            "out.noisy": scheduler.add_noise(original, noise, t),
            "out.velocity": scheduler.get_velocity(original, noise, t),
            "alphas_cumprod": scheduler.alphas_cumprod.to(torch.float32),
        }
        metadata = {"config": json.dumps(folder, sort_keys=True), **versions()}
        save_reproducible(tensors, os.path.join(args.out, case + ".safetensors"), metadata)

    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {len(CASES) + len(DDPM_CASES)} files, {total / 1024:.0f} KiB, to {args.out}")


if __name__ == "__main__":
    main()
