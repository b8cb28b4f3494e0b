"""Left-tail CVaR fine-tuning of Stable Diffusion 3.5 Medium on PickScore (TFFT), with string prompts.

Raise the worst 10 % of PickScores per prompt instead of the mean: p* ∝ p_base · exp(g_η*(r)/λ),
g the CVaR pseudo-reward of r = PickScore of the decoded image. Only a rank-16 LoRA trains.

Needs, already in the Hugging Face cache (nothing is downloaded; a missing model raises
FileNotFoundError naming the cache folder — fetch them first with `huggingface-cli download`):
    stabilityai/stable-diffusion-3.5-medium       (transformer, text encoders, VAE; gated: accept its licence)
    yuvalkirstain/PickScore_v1                    (the PickScore CLIP-H model)
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K         (its tokenizer and image processor)
and a CUDA GPU with ~40 GB (bf16 weights, 512 px latents, gradient checkpointing); not run in tests.

    python examples/sd3_cvar.py
"""

from PIL import Image

import tiltflow as tilt

MODEL = "stabilityai/stable-diffusion-3.5-medium"
PROMPTS = ["a red bicycle", "a cat wearing a hat", "a bowl of soup on a wooden table", "a lighthouse at night"]

# The flow model, in tiltflow's convention (t = 0 noise, t = 1 data); the pipeline's text encoders
# come along frozen, so prompts can be strings (each encoded once). 64 × 64 latents = 512 px images.
base = tilt.models.from_diffusers(MODEL, dtype="bfloat16", shape=(16, 64, 64), device="cuda")

# PickScore reads pixels, the model samples latents: Decoded runs the pipeline's VAE decoder
# (x / scaling + shift, then [-1, 1] -> [0, 1]) inside the reward, so gradients pass through it.
reward = tilt.rewards.Decoded(tilt.rewards.PickScore(device="cuda", dtype="bfloat16"), MODEL,
                              gradient_checkpointing=True)

ft = tilt.finetune(base, tilt.CVaR(reward, level=0.1, tail="left", per_prompt=True), lam=0.05,
                   prompts=PROMPTS, lora_rank=16, iters=400, batch_size=8, grad_accum=2, steps=28,
                   n_loss_times=8, n_offline=256, lr=3e-4, device="cuda", mixed_precision="bf16",
                   gradient_checkpointing=True, out="runs/sd3-left")

# Samples from the fine-tuned model (its LoRA is also in runs/sd3-left/lora.safetensors, which
# tilt.models.load_lora puts back on a freshly loaded base).
for prompt in PROMPTS[:2]:
    latents = ft.sample(8, cond=prompt, steps=28, seed=0)
    images = reward.decode(latents)                               # (8, 3, 512, 512) in [0, 1]
    print(prompt, "PickScore:", [round(float(v), 2) for v in reward.reward(images, prompt)])
    for i, img in enumerate(images):
        Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")).save(
            f"runs/sd3-left/{prompt.replace(' ', '_')}_{i}.png")
