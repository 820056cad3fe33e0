"""Records HF transformers' view of FaceLLM / InternVL3-hf configs and tiny checkpoints as test fixtures.

facellm's config parser and safetensors loader (src/config.rs, src/loader/) are checked against these files, so the
Rust tests need no Python. Everything lands in tests/fixtures/config/ (kept under 2 MB):

  full/<name>/config.json           InternVL3-{1B,8B,38B}-hf shaped configs (MODEL_SPEC §1), written by
                                    InternVLConfig(...).save_pretrained, plus a Qwen2.5-0.5B-Instruct Qwen2Config.
  full/<name>/hf_loaded.json        the loaded config's attributes (to_dict of AutoConfig.from_pretrained).
  partial/<name>/config.json        hand-written configs with fields missing or in older spellings (4.5x style:
                                    torch_dtype, rope_theta + rope_scaling, int image_size, eos list, ...).
  partial/<name>/hf_loaded.json     what transformers fills in for them.
  generation/<name>/generation_config.json + hf_loaded.json   generation configs and HF's filled-in view.
  tiny/<name>/                      tiny random checkpoints (bf16), HF's own save_pretrained output unless noted:
      vit300m/                      layer_norm + biases (InternViT-300M style)
      vit300m_sharded/              the same model saved by HF with a small max_shard_size (index + shards)
      vit300m_runtime/              vit300m's tensors renamed to the runtime keys (MODEL_SPEC §2.1), one file
      vit6b/                        rms_norm + qk_norm, no qkv bias (InternViT-6B style)
      vit6b_runtime_sharded/        vit6b's tensors with runtime keys, split by this script into 2 shards + index
      qwen2_tied/                   text-only Qwen2ForCausalLM with tie_word_embeddings=true (HF stores no lm_head)
    each HF-written folder has hf_tensors.json: [[name, shape, dtype], ...] exactly as HF wrote it.
    Finding: transformers 5.17 save_pretrained writes the LEGACY keys for InternVL (`language_model.model.*`,
    `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`): it reverts its load-time key
    renaming on save. Every copy here is re-loaded by HF with no missing/unexpected keys and identical values.

How it was run (transformers 5.17.0, torch 2.11.0, safetensors 0.8.0, CPU):
    tools/.venv/bin/python tools/fixtures_config.py
Re-running reproduces tests/fixtures/config/ byte for byte (random weights are seeded; checked on this machine).
"""

import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "config")


def jsonable(obj):
    """to_dict() holds torch.dtype values and tuples; turn them into plain JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return obj


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def record_loaded(folder):
    cfg = AutoConfig.from_pretrained(folder)
    d = jsonable(cfg.to_dict())
    # layer_types has one entry per layer; keep it short in the fixture, the Rust side only checks the set.
    for sub in (d, d.get("text_config") or {}):
        if isinstance(sub.get("layer_types"), list):
            sub["layer_types"] = sorted(set(sub["layer_types"]))
    write_json(os.path.join(folder, "hf_loaded.json"), d)


# ---------------------------------------------------------------------------------------------------------------
# (a) full configs, MODEL_SPEC §1

VISION_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    norm_type="layer_norm", layer_norm_eps=1e-6, attention_bias=True, use_qk_norm=False,
    image_size=[448, 448], patch_size=[14, 14], hidden_act="gelu", layer_scale_init_value=0.1,
    use_mean_pooling=True, use_absolute_position_embeddings=True, use_mask_token=False,
)
VISION_6B = dict(VISION_300M, hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                 intermediate_size=12800, norm_type="rms_norm", attention_bias=False, use_qk_norm=True)
ROPE_DYN = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}


def text_cfg(hidden, layers, heads, kv, inter, max_window_layers):
    return dict(
        model_type="qwen2", vocab_size=151674, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters=dict(ROPE_DYN),
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
        max_window_layers=max_window_layers, attention_dropout=0.0, initializer_range=0.02,
        bos_token_id=151643, eos_token_id=151645, dtype="bfloat16", architectures=["Qwen2ForCausalLM"],
    )


FULL = {
    "internvl3_1b": (VISION_300M, text_cfg(896, 24, 14, 2, 4864, 70)),
    "internvl3_8b": (VISION_300M, text_cfg(3584, 28, 28, 4, 18944, 28)),
    "internvl3_38b": (VISION_6B, text_cfg(5120, 64, 40, 8, 27648, 64)),
}


def write_full():
    for name, (vision, text) in FULL.items():
        cfg = InternVLConfig(
            vision_config=dict(vision), text_config=dict(text), image_token_id=151667, image_seq_length=256,
            downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=False, dtype="bfloat16",
            architectures=["InternVLForConditionalGeneration"],
        )
        folder = os.path.join(ROOT, "full", name)
        os.makedirs(folder, exist_ok=True)
        cfg.save_pretrained(folder)
        record_loaded(folder)

    # (c) text-only Qwen2ForCausalLM with Qwen2.5-0.5B-Instruct values (tied embeddings, sliding_window stored but off)
    q = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32768, max_window_layers=21, bos_token_id=151643,
        eos_token_id=151645, dtype="bfloat16", architectures=["Qwen2ForCausalLM"],
    )
    folder = os.path.join(ROOT, "full", "qwen2_5_0_5b_instruct")
    os.makedirs(folder, exist_ok=True)
    q.save_pretrained(folder)
    record_loaded(folder)


# ---------------------------------------------------------------------------------------------------------------
# (b) partial / older-style configs. The first one reconstructs the InternVL3-1B-hf hub file as transformers 4.52
# wrote it (torch_dtype, rope_theta + rope_scaling with both `type` and `rope_type`, no top-level
# tie_word_embeddings); the key set is from memory of the hub file, UNVERIFIED against the real file.

PARTIAL = {
    "hub452_internvl3_1b": {
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "hidden_size": 896,
            "initializer_range": 0.02,
            "intermediate_size": 4864,
            "max_position_embeddings": 32768,
            "max_window_layers": 70,
            "model_type": "qwen2",
            "num_attention_heads": 14,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151674,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.0.dev0",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "hidden_size": 1024,
            "image_size": [448, 448],
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-06,
            "layer_scale_init_value": 0.1,
            "model_type": "internvl_vision",
            "norm_type": "layer_norm",
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 24,
            "patch_size": [14, 14],
            "projection_dropout": 0.0,
            "torch_dtype": "bfloat16",
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
            "use_qk_norm": False,
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    },
    # Nothing but the model type: every default at once.
    "internvl_bare": {"model_type": "internvl"},
    # Text config without model_type (defaults to qwen2), without num_key_value_heads (defaults to 32, NOT to
    # num_attention_heads), int image/patch sizes, eos list, both dtype spellings (dtype wins).
    "internvl_sparse": {
        "model_type": "internvl",
        "dtype": "float16",
        "torch_dtype": "float32",
        "vision_config": {"image_size": 224, "patch_size": 14, "norm_type": "rms_norm", "use_qk_norm": True},
        "text_config": {
            "hidden_size": 2048, "num_attention_heads": 32, "num_hidden_layers": 4, "vocab_size": 151674,
            "rope_theta": 500000.0, "eos_token_id": [151645, 151643],
        },
        "image_seq_length": 64,
    },
    # num_key_value_heads: null falls back to num_attention_heads; rope_theta with no rope_scaling.
    "qwen2_kv_null": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": None, "num_hidden_layers": 2, "intermediate_size": 1024,
        "vocab_size": 1000, "rope_theta": 20000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
    },
    # v5 rope_parameters spelling, linear scaling, explicit head_dim.
    "qwen2_rope_linear": {
        "model_type": "qwen2", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 32, "num_hidden_layers": 1, "intermediate_size": 512, "vocab_size": 300,
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
        "eos_token_id": 7, "bos_token_id": 6,
    },
    # Only a model type: Qwen2Config() defaults.
    "qwen2_bare": {"model_type": "qwen2"},
}


def write_partial():
    for name, cfg in PARTIAL.items():
        folder = os.path.join(ROOT, "partial", name)
        write_json(os.path.join(folder, "config.json"), cfg)
        record_loaded(folder)


# ---------------------------------------------------------------------------------------------------------------
# generation_config.json: InternVL3-hf's (MODEL_SPEC §3.9), Qwen2.5-Instruct's sampling one, and an empty one.

GENERATION = {
    "internvl3_hf": {"_from_model_config": True, "bos_token_id": 151643, "eos_token_id": 151645,
                     "transformers_version": "4.52.0.dev0"},
    "qwen2_5_instruct": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                         "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                         "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"},
    "empty": {},
    "lengths": {"eos_token_id": 2, "max_new_tokens": 500, "max_length": 4096},
}


def write_generation():
    for name, cfg in GENERATION.items():
        folder = os.path.join(ROOT, "generation", name)
        write_json(os.path.join(folder, "generation_config.json"), cfg)
        g = GenerationConfig.from_pretrained(folder)
        d = g.to_dict()
        # HF leaves unset fields None and fills them at generate() time from these defaults; record both.
        d["_hf_generate_defaults"] = {k: v for k, v in GenerationConfig._get_default_generation_params().items()
                                      if k in ("max_length", "do_sample", "temperature", "top_k", "top_p",
                                               "repetition_penalty", "num_beams")}
        write_json(os.path.join(folder, "hf_loaded.json"), jsonable(d))


# ---------------------------------------------------------------------------------------------------------------
# (d) tiny checkpoints through HF's own save_pretrained

TINY_TEXT = dict(
    model_type="qwen2", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
    bos_token_id=500, eos_token_id=501, dtype="bfloat16",
)
TINY_VISION_300M = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, norm_type="layer_norm",
    layer_norm_eps=1e-6, attention_bias=True, use_qk_norm=False, image_size=[56, 56], patch_size=[14, 14],
    hidden_act="gelu", use_mean_pooling=True, dtype="bfloat16",
)
TINY_VISION_6B = dict(TINY_VISION_300M, hidden_size=48, num_attention_heads=3, intermediate_size=96,
                      norm_type="rms_norm", attention_bias=False, use_qk_norm=True)


def runtime_name(name):
    """Legacy on-disk key -> runtime key (MODEL_SPEC §2.1)."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def tensor_list(folder):
    out = []
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fname), "pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    out.append([k, list(t.get_shape()), t.get_dtype()])
    out.sort()
    return out


def copy_side_files(src, dst):
    os.makedirs(dst, exist_ok=True)
    for fname in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, fname)):
            shutil.copy(os.path.join(src, fname), os.path.join(dst, fname))


def write_sharded(tensors, dst):
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    total = 0
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(dst, fname), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    write_json(os.path.join(dst, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_tiny(model, name, **kwargs):
    folder = os.path.join(ROOT, "tiny", name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, **kwargs)
    write_json(os.path.join(folder, "hf_tensors.json"), tensor_list(folder))
    return folder


def internvl_tiny(vision, seed):
    torch.manual_seed(seed)
    cfg = InternVLConfig(
        vision_config=dict(vision), text_config=dict(TINY_TEXT), image_token_id=510, image_seq_length=4,
        downsample_ratio=0.5, projector_hidden_act="gelu", tie_word_embeddings=False, dtype="bfloat16",
        architectures=["InternVLForConditionalGeneration"],
    )
    model = InternVLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    # Random init leaves norms at 1/0 and lambdas at 0.1: perturb everything so a swapped tensor cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def check_reload(name, reference):
    """HF must load a copy with no missing/unexpected keys and the same values as the model that was saved."""
    folder = os.path.join(ROOT, "tiny", name)
    cls = type(reference)
    model, info = cls.from_pretrained(folder, output_loading_info=True, dtype=torch.bfloat16)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad:
        sys.exit(f"{name}: HF reload reported {bad}")
    want = reference.state_dict()
    for k, v in model.state_dict().items():
        if not torch.equal(v, want[k]):
            sys.exit(f"{name}: {k} differs after reload")


def write_tiny():
    shutil.rmtree(os.path.join(ROOT, "tiny"), ignore_errors=True)

    vit300m = internvl_tiny(TINY_VISION_300M, 0)
    src = save_tiny(vit300m, "vit300m")
    save_tiny(vit300m, "vit300m_sharded", max_shard_size="100KB")
    tensors = read_all(os.path.join(src, "model.safetensors"))
    dst = os.path.join(ROOT, "tiny", "vit300m_runtime")
    copy_side_files(src, dst)
    save_file({runtime_name(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})

    vit6b = internvl_tiny(TINY_VISION_6B, 1)
    src = save_tiny(vit6b, "vit6b")
    tensors = read_all(os.path.join(src, "model.safetensors"))
    dst = os.path.join(ROOT, "tiny", "vit6b_runtime_sharded")
    copy_side_files(src, dst)
    write_sharded({runtime_name(k): v for k, v in tensors.items()}, dst)

    torch.manual_seed(2)
    qcfg = Qwen2Config(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})
    qcfg.tie_word_embeddings = True
    qcfg.architectures = ["Qwen2ForCausalLM"]
    qwen = Qwen2ForCausalLM(qcfg).to(torch.bfloat16).eval()
    save_tiny(qwen, "qwen2_tied")

    for name in ("vit300m", "vit300m_sharded", "vit300m_runtime"):
        check_reload(name, vit300m)
    for name in ("vit6b", "vit6b_runtime_sharded"):
        check_reload(name, vit6b)
    check_reload("qwen2_tied", qwen)


def main():
    write_full()
    write_partial()
    write_generation()
    write_tiny()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"fixtures in {os.path.normpath(ROOT)}: {total} bytes")


if __name__ == "__main__":
    main()
