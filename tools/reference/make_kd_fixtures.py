#!/usr/bin/env python3
"""The reference for `pea eval kd-step`: one PEA knowledge-distillation step's losses and the gradients of the
loss with respect to every adapter parameter, computed by torch autograd in float64 through the frozen tiny
diffusers UNets of Tests/Fixtures/pipelines. No optimiser update.

Writes, under --out (default Tests/Fixtures/kd):
  adapter_sd1.safetensors   SD1 form, official names: layernorm.{weight,bias} (LayerNorm over 12, eps 1e-5),
                            projector.{0,2,4}.weight (bias-free 12 → 20 → 20 → 16, exact GELU between them);
                            16 = pipelines/sd1/unet's cross_attention_dim
  adapter_sdxl.safetensors  SDXL form: the same stack 12 → 20 → 20 → 16 (16 = the pooled width P that
                            pipelines/sdxl/unet's add_embedding expects: projection_class_embeddings_input_dim 64
                            − 6·addition_time_embed_dim 8), then fc.{weight,bias} (16 → 32 with bias, 32 = its
                            cross_attention_dim)
  <case>.safetensors        the inputs of `pea eval kd-step` and the expected outputs (below); metadata
                            `fixture` (sorted JSON: case, unet folder relative to Tests/Fixtures, adapter file,
                            hybrid, sdxl, diffusers/torch versions)
Cases:
  sd1_plain    pipelines/sd1/unet, B 3, latent 8×8, L 7, uncond_mask [0,1,0], no zh_or_not
  sd1_hybrid   the same UNet and adapter, uncond_mask [0,0,1], zh_or_not [1,0,1]
  sdxl_plain   pipelines/sdxl/unet, B 3, latent 8×12 (non-square), L 7, uncond_mask [0,1,0], no zh_or_not

Inputs (float32 unless said): noisy_latents [B,4,h,w], noise [B,4,h,w] (the ε target), timesteps [B] int64,
student_states / student_states_uncond [B,L,Din] (a language-specific encoder's last hidden state, BEFORE the
adapter), teacher_states / teacher_states_uncond [B,L,Dc] (English encoder), uncond_mask [B] (0/1), optional
zh_or_not [B] (0/1; present → hybrid). SDXL also: time_ids [B,6], teacher_text_embeds and
teacher_text_embeds_uncond [B,P].
Outputs: loss_task, loss_logits, loss_features, loss (each shape [1]) and grad.<official parameter name> for
every adapter parameter (grad.layernorm.weight, grad.layernorm.bias, grad.projector.0.weight, …, grad.fc.weight,
grad.fc.bias). For debugging only (not part of the command's contract), tensors prefixed `ref.`:
ref.student_conditioning / ref.teacher_conditioning (the encoder_hidden_states each UNet got),
ref.student_text_embeds (SDXL), ref.student_eps / ref.teacher_eps, ref.feature_loss.<down.i|mid|up.i> ([1] each,
unweighted, masked as the loss), ref.grad_<task|logits|features>.<name> (the gradient of that loss term alone,
loss_features unweighted: grad = grad_task + grad_logits + 0.1·grad_features).

Semantics, as in the official training scripts of OPPO-Mente-Lab/PEA-Diffusion (commit 545c431), train_sd_zh.py
`StableDiffusion.training_step` and train_sdxl_zh.py `training_step` (learned from them; written here):
  * Adapter: layernorm → projector (Linear, GELU, Linear, GELU, Linear; bias-free, nn.GELU = exact erf); SDXL:
    x = stack(states); sequence = fc(GELU(x)); pooled = mean(x over tokens) (`MLP.forward`, use_residual=False in
    every configuration the SDXL script builds).
  * The adapter runs on BOTH the conditional and the uncond states, and the switch is made after it:
    student encoder_hidden_states = where(uncond_mask, adapter(student_states_uncond), adapter(student_states))
    (train_sd_zh.py: `self.proj(...)` on both, then `torch.where(prompt_mask, ..._uncond, ...)`); teacher:
    where(uncond_mask, teacher_states_uncond, teacher_states) (`torch.where(prompt_mask, negative_prompt_embeds,
    prompt_embeds)`). Gradients therefore reach the adapter through the uncond states of masked samples only.
  * SDXL pooled vector: NOT switched, on either side. The student's text_embeds is the pooled output of the
    adapter on the CONDITIONAL states (`add_text_embeds, encoder_hidden_states = self.proj(...)`;
    `add_text_embeds_uncond` is computed and never used), for every sample, masked or not; the teacher's is the
    English encoder's pooled vector of the conditional caption (`pooled_prompt_embeds` from encode_prompt), for
    every sample. So teacher_text_embeds_uncond is an input the reference ignores (it differs from
    teacher_text_embeds here, so using it would show). time_ids are the same for both sides.
  * Student ε̂ = unet(noisy_latents, timesteps, student conditioning); teacher ε̂ = the same UNet (the official
    code loads a second copy of the same weights, `unet_teacher`) with the teacher conditioning, under no_grad.
  * Features: forward hooks on every down block (output[0]: the hidden states after the downsampler, or after
    the last resnet/attention of a block without one), the mid block (its output) and every up block (its
    output) — `cast_hook`/`getActivation`; the official NUM_blocks (4 for SD1.5, 3 for SDXL) is every block.
  * loss_task = mean_b( mean_chw( (ε̂_s − noise)² [· zh_or_not_b when hybrid] ) )
    loss_logits = mean_b( mean_chw( (ε̂_s − ε̂_t)² [· (1 − zh_or_not_b) when hybrid] ) )
    loss_features = Σ_features mean_b( mean_chw( (f_t − f_s)² [· (1 − zh_or_not_b) when hybrid] ) )
    loss = loss_task + loss_logits + 0.1 · loss_features
    (`F.mse_loss(..., reduction="none")`, the mask multiplied in, `.mean([1, 2, 3]).mean()`: the batch mean
    divides by B, not by the number of unmasked samples). The SD1 script skips a feature term that holds inf or
    NaN; the SDXL script does not; with finite inputs this never applies.
  * Gradients: d loss / d every adapter parameter; the UNet is frozen (requires_grad False: data gradients flow
    through it, no weight gradients).
Not in eval kd-step (noted for `pea train`): utils/model_utils.py `configure_optimizers` is called with
`model_params=[{'params': self.proj.parameters()}]`, a group without a weight_decay key, and transformers'
AdamW / DeepSpeed's FusedAdam and DeepSpeedCPUAdam are built without weight_decay, so their default 0.0 applies:
the `--weight_decay 0.1` argument never reaches the adapter's optimiser in the released scripts.

The UNet is loaded with UNet2DConditionModel.from_pretrained from the pipelines folder (not modified) and cast to
float64; the adapter's f32 weights are saved, reloaded and cast to float64; inputs are drawn in f32 and cast.
Expected values are stored as float32. The script also checks the float64 gradients against a central finite
difference along a random direction of all adapter parameters, and reports how far a float32 run of the same
step is from the float64 reference (the parity tolerance for gradients is relative L2 ≤ 1e-3).
Everything is seeded; a rerun writes the same bytes.

    python tools/reference/make_kd_fixtures.py --out Tests/Fixtures/kd
(run after make_pipeline_fixtures.py, which writes the UNets)
"""
import argparse
import json
import os

# Fixtures are computed on the CPU; keep a CUDA build of torch from probing (and warning about) the driver.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import warnings

# diffusers' import probes CUDA even so, and a CUDA build of torch warns about an old driver; irrelevant here.
warnings.filterwarnings("ignore", message="CUDA initialization")

import torch
import torch.nn as nn
import torch.nn.functional as F
import diffusers
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from make_model_fixtures import save_reproducible

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "..", "Tests", "Fixtures"))
REF = torch.float64
FEATURE_WEIGHT = 0.1


class Adapter(nn.Module):
    """PEA's adapter (PEA-METHOD.md): layernorm → bias-free Linear/GELU stack; with `fc_out`, the SDXL form that
    returns (fc(GELU(x)), mean of x over tokens). Parameter names are the official ones."""

    def __init__(self, widths, fc_out=None):
        super().__init__()
        self.layernorm = nn.LayerNorm(widths[0], eps=1e-5)
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b, bias=False))
        self.projector = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], fc_out) if fc_out is not None else None

    def forward(self, states):
        x = self.projector(self.layernorm(states))
        if self.fc is None:
            return x, None
        return self.fc(F.gelu(x)), x.mean(dim=1)


def make_adapter(path, widths, fc_out, seed):
    """Default init, then every parameter moved off its initial value; saved in f32 under the official names."""
    torch.manual_seed(seed)
    adapter = Adapter(widths, fc_out)
    with torch.no_grad():
        adapter.layernorm.weight.copy_(1 + 0.3 * torch.randn(widths[0]))
        adapter.layernorm.bias.copy_(0.2 * torch.randn(widths[0]))
        for p in adapter.projector.parameters():
            p.mul_(1.5)  # default init is U(±1/√fan_in); a bit larger so the conditioning is not tiny
        if adapter.fc is not None:
            adapter.fc.bias.copy_(0.3 * torch.randn(fc_out))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, path)


def load_adapter(path, widths, fc_out, dtype):
    adapter = Adapter(widths, fc_out)
    state = load_file(path)
    assert set(state) == set(adapter.state_dict()), sorted(state)
    adapter.load_state_dict(state)
    return adapter.to(dtype)


class FeatureHooks:
    """Records what the official hooks record: down_blocks[i] → output[0], mid_block → output, up_blocks[i] →
    output, into whichever dict `target` is when the UNet runs."""

    def __init__(self, unet):
        self.target = None
        self.names = [f"down.{i}" for i in range(len(unet.down_blocks))] + ["mid"] + \
                     [f"up.{i}" for i in range(len(unet.up_blocks))]
        self.handles = []
        for i, block in enumerate(unet.down_blocks):
            self.handles.append(block.register_forward_hook(self._hook(f"down.{i}", first=True)))
        self.handles.append(unet.mid_block.register_forward_hook(self._hook("mid", first=False)))
        for i, block in enumerate(unet.up_blocks):
            self.handles.append(block.register_forward_hook(self._hook(f"up.{i}", first=False)))

    def _hook(self, name, first):
        def hook(module, args, output):
            self.target[name] = output[0] if first else output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def masked_mean(squared_error, weight):
    """(squared_error [· weight per sample]).mean over C,H,W, then the mean over the batch (divides by B)."""
    if weight is not None:
        squared_error = squared_error * weight.view(-1, 1, 1, 1)
    return squared_error.mean([1, 2, 3]).mean()


def kd_step(unet, hooks, adapter, inputs, dtype):
    """One distillation step's losses, as train_sd_zh.py / train_sdxl_zh.py compute them. Returns the loss parts
    (0-d tensors, differentiable w.r.t. the adapter) and debugging tensors."""
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    b = x["noisy_latents"].shape[0]
    switch = x["uncond_mask"].view(b, 1, 1) > 0.5

    sequence, pooled = adapter(x["student_states"])
    sequence_uncond, _ = adapter(x["student_states_uncond"])  # the pooled vector of the uncond states is unused
    student_conditioning = torch.where(switch, sequence_uncond, sequence)
    teacher_conditioning = torch.where(switch, x["teacher_states_uncond"], x["teacher_states"])
    student_kwargs, teacher_kwargs = {}, {}
    if pooled is not None:  # SDXL: the pooled vectors are not switched (see the docstring)
        student_kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": x["time_ids"]}
        teacher_kwargs["added_cond_kwargs"] = {"text_embeds": x["teacher_text_embeds"], "time_ids": x["time_ids"]}

    student_features, teacher_features = {}, {}
    hooks.target = student_features
    student_eps = unet(x["noisy_latents"], x["timesteps"], encoder_hidden_states=student_conditioning,
                       return_dict=False, **student_kwargs)[0]
    hooks.target = teacher_features
    with torch.no_grad():
        teacher_eps = unet(x["noisy_latents"], x["timesteps"], encoder_hidden_states=teacher_conditioning,
                           return_dict=False, **teacher_kwargs)[0]
    hooks.target = None
    assert set(student_features) == set(teacher_features) == set(hooks.names)

    zh = x.get("zh_or_not")
    task_weight, kd_weight = (zh, 1 - zh) if zh is not None else (None, None)
    loss_task = masked_mean((student_eps - x["noise"]) ** 2, task_weight)
    loss_logits = masked_mean((student_eps - teacher_eps) ** 2, kd_weight)
    feature_losses = {name: masked_mean((teacher_features[name] - student_features[name]) ** 2, kd_weight)
                      for name in hooks.names}
    loss_features = sum(feature_losses[name] for name in hooks.names)
    loss = loss_task + loss_logits + FEATURE_WEIGHT * loss_features
    debug = {"student_conditioning": student_conditioning, "teacher_conditioning": teacher_conditioning,
             "student_eps": student_eps, "teacher_eps": teacher_eps}
    if pooled is not None:
        debug["student_text_embeds"] = pooled
    for name, value in feature_losses.items():
        debug[f"feature_loss.{name}"] = value
    return {"loss_task": loss_task, "loss_logits": loss_logits, "loss_features": loss_features, "loss": loss}, debug


def gradients(adapter, loss):
    names = [n for n, _ in adapter.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in adapter.named_parameters()], retain_graph=True)
    return dict(zip(names, grads))


def finite_difference_check(unet, hooks, adapter, inputs, grads, seed):
    """Central difference of the float64 loss along one random direction over all adapter parameters, against
    the autograd directional derivative."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(adapter.named_parameters())
    direction = {n: torch.randn(p.shape, generator=generator, dtype=REF) for n, p in params.items()}
    analytic = sum((grads[n] * direction[n]).sum() for n in params).item()
    h = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * h * direction[n])
            values.append(kd_step(unet, hooks, adapter, inputs, REF)[0]["loss"].item())
            for n, p in params.items():
                p.sub_(sign * h * direction[n])
    numeric = (values[0] - values[1]) / (2 * h)
    error = abs(numeric - analytic) / max(abs(analytic), 1e-30)
    assert error < 1e-6, (numeric, analytic)
    return error


def rel_l2(a, b):
    return ((a.to(REF) - b.to(REF)).norm() / b.to(REF).norm().clamp_min(1e-30)).item()


# name, unet folder (under Tests/Fixtures), adapter, uncond_mask, zh_or_not, latent (h, w), seed
CASES = [
    ("sd1_plain", "pipelines/sd1/unet", "adapter_sd1.safetensors", [0, 1, 0], None, (8, 8), 1001),
    ("sd1_hybrid", "pipelines/sd1/unet", "adapter_sd1.safetensors", [0, 0, 1], [1, 0, 1], (8, 8), 1002),
    ("sdxl_plain", "pipelines/sdxl/unet", "adapter_sdxl.safetensors", [0, 1, 0], None, (8, 12), 1003),
]
BATCH, TOKENS, STUDENT_WIDTH, HIDDEN = 3, 7, 12, 20


def adapter_shape(unet):
    """(widths, fc_out) for this UNet: SD1 form to cross_attention_dim; SDXL form (text_time) to the pooled width
    that add_embedding expects, then fc to cross_attention_dim."""
    config = unet.config
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        assert unet.add_embedding.linear_1.in_features == pooled + 6 * config.addition_time_embed_dim
        return [STUDENT_WIDTH, HIDDEN, HIDDEN, pooled], config.cross_attention_dim
    return [STUDENT_WIDTH, HIDDEN, HIDDEN, config.cross_attention_dim], None


def make_inputs(unet, uncond_mask, zh_or_not, latent, seed):
    torch.manual_seed(seed)
    h, w = latent
    channels = unet.config.in_channels
    cross = unet.config.cross_attention_dim
    inputs = {
        "noisy_latents": torch.randn(BATCH, channels, h, w),
        "noise": torch.randn(BATCH, channels, h, w),
        "timesteps": torch.randint(0, 1000, (BATCH,), dtype=torch.int64),
        # an encoder's states are not zero-mean, unit-variance: shift and scale them so the LayerNorm matters
        "student_states": 0.7 + 2.0 * torch.randn(BATCH, TOKENS, STUDENT_WIDTH),
        "student_states_uncond": -0.4 + 1.5 * torch.randn(BATCH, TOKENS, STUDENT_WIDTH),
        "teacher_states": torch.randn(BATCH, TOKENS, cross),
        "teacher_states_uncond": torch.randn(BATCH, TOKENS, cross),
        "uncond_mask": torch.tensor(uncond_mask, dtype=torch.float32),
    }
    if zh_or_not is not None:
        inputs["zh_or_not"] = torch.tensor(zh_or_not, dtype=torch.float32)
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        # (original h, w, crop top, left, target h, w) in pixels, as the SDXL training script builds them
        inputs["time_ids"] = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w],
                                           [48, 112, 8, 0, 8 * h, 8 * w],
                                           [1024, 1024, 16, 32, 8 * h, 8 * w]], dtype=torch.float32)[:BATCH]
        inputs["teacher_text_embeds"] = torch.randn(BATCH, pooled)
        inputs["teacher_text_embeds_uncond"] = torch.randn(BATCH, pooled)
    return inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(FIXTURES, "kd"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)

    made_adapters = set()
    for case, unet_dir, adapter_file, uncond_mask, zh_or_not, latent, seed in CASES:
        unet32 = UNet2DConditionModel.from_pretrained(os.path.join(FIXTURES, unet_dir)).eval().requires_grad_(False)
        widths, fc_out = adapter_shape(unet32)
        adapter_path = os.path.join(args.out, adapter_file)
        if adapter_file not in made_adapters:
            make_adapter(adapter_path, widths, fc_out, seed=7 if fc_out is None else 8)
            made_adapters.add(adapter_file)
        inputs = make_inputs(unet32, uncond_mask, zh_or_not, latent, seed)

        unet = UNet2DConditionModel.from_pretrained(os.path.join(FIXTURES, unet_dir)).eval().requires_grad_(False).to(REF)
        hooks = FeatureHooks(unet)
        adapter = load_adapter(adapter_path, widths, fc_out, REF)
        losses, debug = kd_step(unet, hooks, adapter, inputs, REF)
        grads = gradients(adapter, losses["loss"])
        for part in ("task", "logits", "features"):  # each term's own gradient, for debugging
            for k, v in gradients(adapter, losses[f"loss_{part}"]).items():
                debug[f"grad_{part}.{k}"] = v
        fd_error = finite_difference_check(unet, hooks, adapter, inputs, grads, seed)
        hooks.remove()

        # The same step in float32, to show the gradient tolerance is reachable in f32.
        hooks32 = FeatureHooks(unet32)
        adapter32 = load_adapter(adapter_path, widths, fc_out, torch.float32)
        losses32, _ = kd_step(unet32, hooks32, adapter32, inputs, torch.float32)
        grads32 = gradients(adapter32, losses32["loss"])
        hooks32.remove()

        tensors = {k: v.contiguous() for k, v in inputs.items()}
        for k, v in losses.items():
            tensors[k] = v.detach().reshape(1).to(torch.float32)
        for k, v in grads.items():
            tensors[f"grad.{k}"] = v.to(torch.float32).contiguous()
        for k, v in debug.items():
            tensors[f"ref.{k}"] = v.detach().reshape(-1 if v.dim() == 0 else v.shape).to(torch.float32).contiguous()
        metadata = {"case": case, "unet": unet_dir, "adapter": adapter_file, "hybrid": zh_or_not is not None,
                    "sdxl": fc_out is not None, "diffusers": diffusers.__version__,
                    "torch": torch.__version__.split("+")[0]}
        path = os.path.join(args.out, case + ".safetensors")
        save_reproducible(tensors, path, {"fixture": json.dumps(metadata, sort_keys=True)})
        back = load_file(path)
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)

        parts = ", ".join(f"{k} {v.item():.6g}" for k, v in losses.items())
        worst = max(rel_l2(grads32[k], grads[k]) for k in grads)
        smallest = min(grads[k].norm().item() for k in grads)
        print(f"{case}: {parts}; {len(grads)} grads (smallest norm {smallest:.3g}); "
              f"finite difference rel err {fd_error:.1e}; f32 vs f64 worst grad rel L2 {worst:.1e}")

    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {len(CASES)} kd cases and {len(made_adapters)} adapters ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
