#!/usr/bin/env python3
"""Tiny deterministic checkpoints + HF reference outputs for the model-forward tests.

For each case (vit300m, vit6b: InternVLForConditionalGeneration; qwen2: Qwen2ForCausalLM) this script
  1. builds the HF config (real geometry: 448px tiles, patch 14, 256 image tokens per tile, full vocab),
  2. fills every tensor from the counter-based recipe in tests/fixtures/model/RECIPE.md (splitmix64 keyed by
     the tensor name, uniform in [offset-amp, offset+amp), rounded to bf16),
  3. writes the checkpoint with save_pretrained (bf16 safetensors, the real on-disk format) into a cache folder
     (not committed: the Rust tests regenerate it bit-exactly from the recipe and the committed header),
  4. reloads that folder in float32 with eager attention and records HF's outputs: vision tower output,
     pixel shuffle, projector, per-layer LLM hidden states, logits, greedy generation with margins.

Outputs under tests/fixtures/model/<case>/: config.json, generation_config.json (as written by HF),
model.safetensors.header.json (exact header bytes of the written file), ref.safetensors (float tensors),
ref.json (recipe table, inputs, generated ids, margins, checks). See RECIPE.md for the exact layout.

Usage: tools/.venv/bin/python tools/fixtures_model.py [--case vit300m|vit6b|qwen2 ...] [--ckpt-dir DIR]
"""
import argparse
import hashlib
import json
import os
import struct
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_ROOT = os.path.join(REPO, "tests", "fixtures", "model")
TOKENIZER_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "tokenizer", "qwen2_bpe"))
if not os.path.isdir(TOKENIZER_DIR):
    TOKENIZER_DIR = "/work/shared/data/tokenizer/qwen2_bpe"

RECIPE_VERSION = "facellm-fixture-v1"
IMAGE_TOKEN_ID = 151667
IMG_START_ID = 151665
IMG_END_ID = 151666
IM_END_ID = 151645
TOKENS_PER_TILE = 256
N_NEW = 12
TOPK_POS = 8          # top-k logits stored for every prompt position
LOGIT_STRIDE = 8      # last-position logits stored at vocab ids 0, 8, 16, ...

# ----------------------------------------------------------------------------------------------------------
# Recipe: counter-based PRNG (mirrored in Rust; RECIPE.md is the normative text)
# ----------------------------------------------------------------------------------------------------------
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def tensor_seed(case: str, name: str) -> int:
    return fnv1a64(f"{RECIPE_VERSION}/{case}/{name}".encode("utf-8"))


def splitmix64(seed: int, n: int) -> np.ndarray:
    """Element i (0-based) = splitmix64 finalizer of (seed + (i+1)*GOLDEN) mod 2^64."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        z = z ^ (z >> np.uint64(31))
    return z


def recipe_values(seed: int, n: int, offset: np.float32, amp: np.float32) -> np.ndarray:
    """float32 values before the bf16 rounding: offset + amp*u, u = (k - 2^23) / 2^23, k = top 24 bits."""
    k = (splitmix64(seed, n) >> np.uint64(40)).astype(np.int64)
    u = (k - (1 << 23)).astype(np.float32) * np.float32(2.0 ** -23)   # exact, in [-1, 1)
    v = (np.float32(amp) * u).astype(np.float32)                      # one f32 rounding
    if offset != 0:
        v = (v + np.float32(offset)).astype(np.float32)               # one f32 rounding (no FMA)
    return v


def to_bf16(v: np.ndarray) -> torch.Tensor:
    """Round-to-nearest-even float32 -> bfloat16 (torch's conversion)."""
    return torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)


def f32(x) -> np.float32:
    return np.float32(x)


def rule_for(name: str, shape, cfg) -> tuple:
    """(offset, amplitude, rule) for a tensor name (runtime / on-disk v5 names). Amplitudes as float32."""
    def lin(fan_in, gain=1.0):
        return f32(0.0), f32(gain * (3.0 / fan_in) ** 0.5), f"uniform +-{gain}*sqrt(3/{fan_in})"

    last = name.split(".")[-1]
    if name.endswith("embeddings.cls_token"):
        return f32(0.0), f32(1.0), "cls uniform +-1"
    if name.endswith("embeddings.position_embeddings"):
        return f32(0.0), f32(0.5), "pos uniform +-0.5"
    if name.endswith("patch_embeddings.projection.weight"):
        return lin(shape[1] * shape[2] * shape[3])
    if last in ("lambda_1", "lambda_2"):
        return f32(0.55), f32(0.45), "layer scale 0.55+-0.45"
    if "norm" in name.split(".")[-2]:
        # LayerNorm / RMSNorm parameters (layernorm_before/after, q_norm, k_norm, layer_norm, input_layernorm,
        # post_attention_layernorm, final norm)
        if last == "weight":
            return f32(1.0), f32(0.1), "norm weight 1+-0.1"
        return f32(0.0), f32(0.1), "norm bias +-0.1"
    if name.endswith("embed_tokens.weight"):
        return f32(0.0), f32(cfg["embed_amp"]), f"embedding uniform +-{cfg['embed_amp']}"
    if name.endswith("multi_modal_projector.linear_2.weight"):
        return lin(shape[1], cfg["proj_gain"])
    if name.endswith("lm_head.weight"):
        return lin(shape[1], cfg["lm_head_gain"])
    if last == "bias":
        return f32(0.0), f32(0.1), "bias +-0.1"
    if last == "weight" and len(shape) == 2:
        return lin(shape[1])
    raise ValueError(f"no recipe rule for {name} {shape}")


def pixel_tile(tile: str) -> torch.Tensor:
    """Synthetic normalized tile [3,448,448]: uniform +-2, bf16-exact, stored as float32."""
    seed = fnv1a64(f"{RECIPE_VERSION}/pixels/{tile}".encode())
    v = recipe_values(seed, 3 * 448 * 448, f32(0.0), f32(2.0))
    return to_bf16(v).float().reshape(3, 448, 448)


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------
VOCAB_IVL = 151674
CASES = {
    "vit300m": {
        "kind": "internvl",
        "vision": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                       norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
        "text": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=160,
                     num_hidden_layers=3),
        "embed_amp": 1.0, "lm_head_gain": 4.0, "proj_gain": 0.5,
    },
    "vit6b": {
        "kind": "internvl",
        "vision": dict(hidden_size=80, num_attention_heads=5, intermediate_size=160, num_hidden_layers=2,
                       norm_type="rms_norm", attention_bias=False, use_qk_norm=True),
        "text": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=160,
                     num_hidden_layers=2),
        "embed_amp": 1.0, "lm_head_gain": 4.0, "proj_gain": 0.5,
    },
    "qwen2": {
        "kind": "qwen2",
        "text": dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, intermediate_size=160,
                     num_hidden_layers=2, vocab_size=151936, tie_word_embeddings=True),
        "embed_amp": 0.15, "lm_head_gain": None,
    },
}


def text_config_dict(spec):
    d = dict(
        model_type="qwen2",
        vocab_size=VOCAB_IVL,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=70,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=IM_END_ID,
        pad_token_id=151643,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    d.update(spec["text"])
    return d


def build_model(case):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    spec = CASES[case]
    if spec["kind"] == "internvl":
        v = dict(image_size=448, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
                 layer_scale_init_value=0.1, use_mean_pooling=True, use_absolute_position_embeddings=True,
                 use_mask_token=False, attention_dropout=0.0, projection_dropout=0.0, hidden_dropout_prob=0.0)
        v.update(spec["vision"])
        cfg = InternVLConfig(
            vision_config=v,
            text_config=text_config_dict(spec),
            image_token_id=IMAGE_TOKEN_ID,
            image_seq_length=TOKENS_PER_TILE,
            downsample_ratio=0.5,
            projector_hidden_act="gelu",
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
            dtype="bfloat16",
        )
        model = InternVLForConditionalGeneration(cfg)
    else:
        cfg = Qwen2Config(**text_config_dict(spec))
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.bos_token_id = 151643
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = 151643
    return model


def fill_recipe(case, model):
    """Overwrite every stored parameter with recipe values; returns the recipe table."""
    spec = CASES[case]
    table = []
    sd = model.state_dict()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    with torch.no_grad():
        for name, t in sd.items():
            if tied and name == "lm_head.weight":
                continue
            off, amp, rule = rule_for(name, tuple(t.shape), spec)
            seed = tensor_seed(case, name)
            vals = to_bf16(recipe_values(seed, t.numel(), off, amp)).reshape(t.shape)
            t.copy_(vals.to(t.dtype))
            table.append({
                "name": name, "shape": list(t.shape), "seed": f"{seed:016x}",
                "offset": float(off), "amp": float(amp),
                "amp_f32_bits": f"{struct.unpack('<I', struct.pack('<f', amp))[0]:08x}",
                "offset_f32_bits": f"{struct.unpack('<I', struct.pack('<f', off))[0]:08x}",
                "rule": rule,
            })
    if tied:
        model.tie_weights()
    for row in table:
        row["disk_name"] = disk_name(row["name"], spec["kind"] == "internvl")
    return table


def disk_name(name: str, internvl: bool) -> str:
    """Key that transformers 5.17 save_pretrained writes for a runtime parameter name (InternVL keeps the legacy
    layout on disk, MODEL_SPEC 2.1; Qwen2ForCausalLM names are unchanged)."""
    for rt, disk in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(rt):
            return disk + name[len(rt):]
    if internvl and name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return name


# ----------------------------------------------------------------------------------------------------------
# Tokenizer + prompts (shared Qwen2 BPE files; the processor's expansion is checked against HF's processor)
# ----------------------------------------------------------------------------------------------------------
def load_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    with open(os.path.join(TOKENIZER_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(TOKENIZER_DIR, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(l.rstrip("\n").split(" ")) for l in f if l.strip() and not l.startswith("#version")]
    with open(os.path.join(TOKENIZER_DIR, "internvl3_added_tokens.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens"]
    vocab.update({a["content"]: a["id"] for a in added})
    extra = {"start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=extra)
    tok.add_tokens([AddedToken(a["content"], special=a["special"], normalized=a["normalized"], lstrip=a["lstrip"],
                               rstrip=a["rstrip"], single_word=a["single_word"]) for a in added])
    for a in added:
        assert tok.convert_tokens_to_ids(a["content"]) == a["id"], a
    with open(os.path.join(TOKENIZER_DIR, "internvl3_hf_chat_template.jinja"), encoding="utf-8") as f:
        tok.chat_template = f.read()
    return tok


PROMPTS = {
    "image1": {"messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe the face image based on visual information."}]}],
        "tiles": [["A"]]},
    "image2": {"messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"},
        {"type": "text", "text": "What is different between these two faces?"}]}],
        "tiles": [["A"], ["B"]]},
    "text": {"messages": [{"role": "user", "content": "What does a happy face look like?"}], "tiles": []},
}
QWEN2_PROMPT = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three facial expressions."}], "tiles": []}


def build_prompt(tok, messages, tiles_per_image):
    """Chat template (MODEL_SPEC 5.2) then the processor expansion (5.3). Returns (templated text, ids)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = text.split("<IMG_CONTEXT>")
    assert len(parts) - 1 == len(tiles_per_image)
    out = parts[0]
    for n, rest in zip(tiles_per_image, parts[1:]):
        out += "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * n) + "</img>" + rest
    ids = tok(out, add_special_tokens=False)["input_ids"]
    return text, ids


def hf_processor_ids(tok, messages, n_images):
    """input_ids from HF's own InternVLProcessor on 448x448 images (1 tile each), for cross-checking."""
    from PIL import Image
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    ip = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, resample=3, do_resize=True, do_rescale=True,
                                   do_normalize=True, do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225], crop_to_patches=False, min_patches=1,
                                   max_patches=12)
    try:
        proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                                 image_seq_length=256,
                                 chat_template=tok.chat_template)
    except Exception as e:  # pragma: no cover - diagnostic only
        return None, f"processor unavailable: {e!r}"
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    imgs = [Image.new("RGB", (448, 448), (128, 100, 90)) for _ in range(n_images)]
    enc = proc(text=[text], images=imgs if imgs else None, return_tensors="pt")
    return enc["input_ids"][0].tolist(), "ok"


# ----------------------------------------------------------------------------------------------------------
# Reference run
# ----------------------------------------------------------------------------------------------------------
def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def save_checkpoint(case, ckpt_dir, out_dir):
    model = build_model(case)
    table = fill_recipe(case, model)
    model = model.to(torch.bfloat16)
    os.makedirs(ckpt_dir, exist_ok=True)
    model.save_pretrained(ckpt_dir)
    files = sorted(os.listdir(ckpt_dir))
    st = os.path.join(ckpt_dir, "model.safetensors")
    assert os.path.exists(st), files
    with open(st, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
    hdr = json.loads(header)
    disk = {k for k in hdr if k != "__metadata__"}
    want = {r["disk_name"] for r in table}
    assert disk == want, (sorted(disk - want)[:5], sorted(want - disk)[:5])
    for r in table:
        assert hdr[r["disk_name"]]["shape"] == r["shape"] and hdr[r["disk_name"]]["dtype"] == "BF16", r
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.safetensors.header.json"), "wb") as f:
        f.write(header)
    for fn in ("config.json", "generation_config.json"):
        with open(os.path.join(ckpt_dir, fn), "rb") as src, open(os.path.join(out_dir, fn), "wb") as dst:
            dst.write(src.read())
    return table, {"files": files, "model_safetensors_sha256": sha256_file(st),
                   "model_safetensors_size": os.path.getsize(st), "header_len": n}


def bf16_bits_rne(v: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (no NaN/Inf occur in the recipe)."""
    b = v.astype("<f4").view(np.uint32)
    return ((b + (((b >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)).astype("<u2")


def regenerate_safetensors(case_dir: str) -> str:
    """Rebuild model.safetensors from the committed files only (header + ref.json recipe table), exactly as a
    Rust test would (numpy integer/float32 ops, no torch), and return its sha256."""
    with open(os.path.join(case_dir, "model.safetensors.header.json"), "rb") as f:
        header = f.read()
    with open(os.path.join(case_dir, "ref.json")) as f:
        ref = json.load(f)
    hdr = json.loads(header)
    by_disk = {r["disk_name"]: r for r in ref["recipe_table"]}
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(header)))
    h.update(header)
    pos = 0
    for key in sorted((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][0]):
        r = by_disk[key]
        start, end = hdr[key]["data_offsets"]
        assert start == pos, key
        off = np.frombuffer(bytes.fromhex(r["offset_f32_bits"])[::-1], dtype="<f4")[0]
        amp = np.frombuffer(bytes.fromhex(r["amp_f32_bits"])[::-1], dtype="<f4")[0]
        n = int(np.prod(r["shape"]))
        data = bf16_bits_rne(recipe_values(int(r["seed"], 16), n, off, amp)).tobytes()
        assert len(data) == end - start, key
        h.update(data)
        pos = end
    return h.hexdigest()


def load_reference(case, ckpt_dir):
    from transformers import InternVLForConditionalGeneration, Qwen2ForCausalLM

    cls = InternVLForConditionalGeneration if CASES[case]["kind"] == "internvl" else Qwen2ForCausalLM
    model = cls.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def verify_loaded(case, model, table):
    """The loaded float32 parameters must equal the recipe's bf16 values exactly."""
    sd = model.state_dict()
    for row in table:
        off, amp = np.float32(row["offset"]), np.float32(row["amp"])
        n = int(np.prod(row["shape"]))
        want = to_bf16(recipe_values(int(row["seed"], 16), n, off, amp)).float().reshape(row["shape"])
        got = sd[row["name"]]
        assert got.dtype == torch.float32 and torch.equal(got, want), row["name"]
    return True


def hidden_positions(ids):
    """Positions whose per-layer hidden states are stored for image cases: every non-image position plus,
    for each run of image tokens, its first two, its middle (start+128) and its last two positions."""
    ids = np.asarray(ids)
    pos = set(np.nonzero(ids != IMAGE_TOKEN_ID)[0].tolist())
    i = 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_ID:
            j = i
            while j < len(ids) and ids[j] == IMAGE_TOKEN_ID:
                j += 1
            pos.update([i, i + 1, i + (j - i) // 2, j - 2, j - 1])
            i = j
        else:
            i += 1
    return sorted(pos)


def run_case(model, kind, prefix, ids, pixel_values, tensors, store_full_hidden):
    """Forward with hooks + greedy generation; fills tensors[prefix.*] and returns a metadata dict."""
    lm = model.model.language_model if kind == "internvl" else model.model
    layers = lm.layers
    cap = {}
    hooks = []
    for li, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, li=li: cap.__setitem__(f"layer{li}", (o[0] if isinstance(o, tuple) else o).detach())))
    if kind == "internvl" and pixel_values is not None:
        hooks.append(model.model.vision_tower.register_forward_hook(
            lambda m, a, o: cap.__setitem__("vision_last", o.last_hidden_state.detach())))
        hooks.append(model.model.multi_modal_projector.register_forward_hook(
            lambda m, a, o: cap.update(shuffle=a[0].detach(), proj=o.detach())))  # returns None: output kept
    inp = torch.tensor([ids])
    mask = torch.ones_like(inp)
    kwargs = dict(input_ids=inp, attention_mask=mask, output_hidden_states=True, use_cache=False)
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    with torch.inference_mode():
        out = model(**kwargs)
    for h in hooks:
        h.remove()
    L = len(layers)
    hs = out.hidden_states
    assert len(hs) == L + 1
    # HF's tuple: [inputs_embeds, layer0 .. layer(L-2) outputs, final-norm output]; check our hooks agree.
    for li in range(L - 1):
        assert torch.equal(hs[li + 1][0], cap[f"layer{li}"][0]), li
    final_norm = hs[L][0]
    embeds = hs[0][0]
    logits = out.logits[0].float()
    S, V = logits.shape
    assert S == len(ids)

    m = {"seq_len": S, "num_layers": L}
    if store_full_hidden:
        tensors[f"{prefix}.embeds"] = embeds
        for li in range(L):
            tensors[f"{prefix}.layer{li}"] = cap[f"layer{li}"][0]
        m["hidden_positions"] = "all"
    else:
        pos = hidden_positions(ids)
        idx = torch.tensor(pos)
        tensors[f"{prefix}.embeds"] = embeds[idx]
        for li in range(L):
            tensors[f"{prefix}.layer{li}"] = cap[f"layer{li}"][0][idx]
        m["hidden_positions"] = pos
    tensors[f"{prefix}.final_norm"] = final_norm
    tv, ti = logits.topk(TOPK_POS, dim=-1)
    tensors[f"{prefix}.logits_topk_values"] = tv
    tensors[f"{prefix}.logits_topk_ids"] = ti.to(torch.int32)
    tensors[f"{prefix}.logits_last_strided"] = logits[-1, ::LOGIT_STRIDE].contiguous()
    m["prompt_argmax"] = ti[:, 0].tolist()
    margins_prompt = (tv[:, 0] - tv[:, 1])
    m["prompt_margin_min"] = float(margins_prompt.min())
    m["prompt_margin_frac_gt_1e-3"] = float((margins_prompt > 1e-3).float().mean())
    m["prompt_argmax_unique"] = len(set(m["prompt_argmax"]))
    if "vision_last" in cap:
        meta_v = {"vision_last": cap["vision_last"], "shuffle": cap["shuffle"], "proj": cap["proj"]}
    else:
        meta_v = None

    # Greedy generation (HF generate, KV cache, eos = <|im_end|>).
    gkw = dict(input_ids=inp, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, num_beams=1,
               repetition_penalty=1.0, temperature=None, top_p=None, top_k=None, eos_token_id=IM_END_ID,
               pad_token_id=151643, output_logits=True, return_dict_in_generate=True)
    if pixel_values is not None:
        gkw["pixel_values"] = pixel_values
    with torch.inference_mode():
        g = model.generate(**gkw)
    gen = g.sequences[0, S:].tolist()
    step_logits = torch.stack([l[0].float() for l in g.logits])       # [steps, V]
    sv, si = step_logits.topk(5, dim=-1)
    m["generated_ids"] = gen
    m["gen_top1_top2_margin"] = (sv[:, 0] - sv[:, 1]).tolist()
    m["gen_top5_ids"] = si.tolist()
    m["gen_top5_logits"] = sv.tolist()
    m["gen_unique_tokens"] = len(set(gen))
    # First generated step must reproduce the full-forward last-position logits.
    m["gen_step0_vs_forward_max_abs"] = float((step_logits[0] - logits[-1]).abs().max())
    return m, meta_v


def write_safetensors(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)


def do_case(case, tok, ckpt_root):
    import transformers

    out_dir = os.path.join(OUT_ROOT, case)
    ckpt_dir = os.path.join(ckpt_root, case)
    spec = CASES[case]
    kind = spec["kind"]
    table, ckpt_info = save_checkpoint(case, ckpt_dir, out_dir)
    model = load_reference(case, ckpt_dir)
    verify_loaded(case, model, table)
    attn = {"top": model.config._attn_implementation}
    if kind == "internvl":
        attn["vision"] = model.model.vision_tower.config._attn_implementation
        attn["text"] = model.model.language_model.config._attn_implementation
    assert all(a == "eager" for a in attn.values()), attn

    tensors, cases_meta = {}, {}
    tiles = {"A": pixel_tile("A"), "B": pixel_tile("B")}
    prompts = PROMPTS if kind == "internvl" else {"text": QWEN2_PROMPT}
    for pname, p in prompts.items():
        tiles_per_image = [len(t) for t in p["tiles"]]
        text, ids = build_prompt(tok, p["messages"], tiles_per_image)
        proc_ids, proc_status = (None, "n/a (text-only model)")
        if kind == "internvl":
            proc_ids, proc_status = hf_processor_ids(tok, p["messages"], len(p["tiles"]))
            if proc_ids is not None:
                assert proc_ids == ids, f"{pname}: HF processor ids differ from the manual expansion"
        tile_names = [t for img in p["tiles"] for t in img]
        pv = torch.stack([tiles[t] for t in tile_names]) if tile_names else None
        m, vis = run_case(model, kind, pname, ids, pv, tensors, store_full_hidden=(pv is None))
        if pname == "image1":
            # Sanity: the image must matter. Same prompt with tile B instead of tile A.
            with torch.inference_mode():
                alt = model(input_ids=torch.tensor([ids]), pixel_values=tiles["B"][None]).logits[0, -1].float()
                base = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0, -1].float()
            m["image_influence_tileB_last_logits_max_abs"] = float((alt - base).abs().max())
            m["image_influence_argmax_changed"] = bool(int(alt.argmax()) != int(base.argmax()))
        m.update({"messages": p["messages"], "prompt_text_before_expansion": text, "tiles_per_image": tiles_per_image,
                  "input_ids": ids, "tiles": tile_names,
                  "hf_processor_check": "ids equal" if proc_ids is not None else proc_status})
        if vis is not None:
            m["vision"] = {"tiles": tile_names}
            if pname == "image2":
                # Vision references for tiles A and B come from this (batched) call.
                tensors["vision.last_hidden_state"] = vis["vision_last"]
                tensors["vision.pixel_shuffle_tileA"] = vis["shuffle"][0]
                tensors["vision.projector"] = vis["proj"]
            else:
                cases_meta.setdefault("_vis_image1", vis)
        # Non-degeneracy gates (RECIPE.md "Sanity"): fail loudly if a recipe change makes the references weak.
        assert m["prompt_margin_frac_gt_1e-3"] >= 0.95, (case, pname, "flat prompt logits")
        assert min(m["gen_top1_top2_margin"]) > 1e-3, (case, pname, "greedy step with a near tie")
        assert m["gen_unique_tokens"] >= 4, (case, pname, "greedy output collapses to a repeated token")
        if pname == "image1":
            assert m["image_influence_tileB_last_logits_max_abs"] > 0.1, (case, "image has no influence")
        cases_meta[pname] = m
        print(f"[{case}/{pname}] S={m['seq_len']} gen={m['generated_ids']} uniq={m['gen_unique_tokens']} "
              f"min_gen_margin={min(m['gen_top1_top2_margin']):.4g} prompt_margin>1e-3: "
              f"{m['prompt_margin_frac_gt_1e-3']:.3f} argmax_uniq={m['prompt_argmax_unique']} "
              f"step0diff={m['gen_step0_vs_forward_max_abs']:.2e}", flush=True)
    if kind == "internvl":
        v1 = cases_meta.pop("_vis_image1")
        cases_meta["image1"]["vision"]["tileA_vs_image2_batched_max_abs"] = {
            "last_hidden_state": float((v1["vision_last"][0] - tensors["vision.last_hidden_state"][0]).abs().max()),
            "projector": float((v1["proj"][0] - tensors["vision.projector"][0]).abs().max()),
        }
        # Closed-form pixel shuffle (MODEL_SPEC 3.5) must match what HF fed the projector.
        lh = tensors["vision.last_hidden_state"][0, 1:]             # [1024, h]
        h = lh.shape[-1]
        grid = lh.reshape(32, 32, h)
        closed = torch.empty(256, 4 * h)
        for r in range(16):
            for s in range(16):
                for dy in range(2):
                    for dx in range(2):
                        closed[r * 16 + s, dy * 2 * h + dx * h: dy * 2 * h + dx * h + h] = grid[2 * r + dy, 2 * s + dx]
        assert torch.equal(closed, tensors["vision.pixel_shuffle_tileA"]), "pixel shuffle closed form"
        tensors["pixel_values_check.tileA_first64"] = tiles["A"].reshape(-1)[:64]
        tensors["pixel_values_check.tileB_first64"] = tiles["B"].reshape(-1)[:64]

    # The committed header + recipe table alone must reproduce HF's file byte for byte.
    regen = None  # filled after ref.json is written (it holds the recipe table)
    st_path = os.path.join(out_dir, "ref.safetensors")
    # One metadata entry only: safetensors orders metadata keys arbitrarily, which would make reruns differ.
    write_safetensors(st_path, tensors, {"fixture": f"{RECIPE_VERSION}/{case}"})
    ref = {
        "case": case,
        "written_by": "tools/fixtures_model.py",
        "recipe_version": RECIPE_VERSION,
        "reference": {"class": type(model).__name__, "dtype": "float32 (bf16 checkpoint upcast exactly)",
                      "attn_implementation": attn, "torch": torch.__version__,
                      "transformers": transformers.__version__},
        "checkpoint": ckpt_info,
        "model_config": {k: v for k, v in spec.items() if k in ("vision", "text")},
        "pixel_tiles": {t: {"seed": f"{fnv1a64(f'{RECIPE_VERSION}/pixels/{t}'.encode()):016x}", "offset": 0.0,
                            "amp": 2.0, "shape": [3, 448, 448],
                            "sha256_f32le": hashlib.sha256(tiles[t].numpy().astype('<f4').tobytes()).hexdigest()}
                        for t in ("A", "B")} if kind == "internvl" else None,
        "storage": {"topk_per_position": TOPK_POS, "logit_stride": LOGIT_STRIDE, "gen_new_tokens": N_NEW},
        "cases": cases_meta,
        "recipe_table": table,
        "ref_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in sorted(tensors.items())},
    }
    with open(os.path.join(out_dir, "ref.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    regen = regenerate_safetensors(out_dir)
    assert regen == ckpt_info["model_safetensors_sha256"], f"{case}: regenerated checkpoint differs"
    print(f"[{case}] checkpoint regenerated from header + recipe: sha256 {regen} matches HF's file", flush=True)
    return ref


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(CASES), help="default: all")
    ap.add_argument("--ckpt-dir", default=os.path.join(HERE, ".cache", "fixture_ckpt"),
                    help="where the (uncommitted) checkpoints are written")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # only affects HF's random init, which the recipe overwrites entirely
    tok = load_tokenizer()
    for case in args.case or list(CASES):
        do_case(case, tok, args.ckpt_dir)
    total = 0
    for root, _, files in os.walk(OUT_ROOT):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"fixtures under {OUT_ROOT}: {total/1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
