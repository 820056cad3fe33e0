"""HF transformers' side of the GPU benchmark, run on the same card in the same device call as
`facellm bench --device cuda`: the InternViT vision tower + pixel shuffle + projector of the published
shapes (random bf16 weights, built on the GPU), at the same tile counts, with eager and SDPA attention.
Times are CUDA-event medians after warm-up, like facellm's. Prints JSON.

    python3 tools/bench_gpu_hf.py --vision 300m,6b --tiles 1,7,13

Needs torch (CUDA) and transformers (5.17 pinned in tools/requirements.txt); the lent GPU machines have both.
"""
import argparse
import json
import sys
import time

import torch
from transformers.generation.streamers import BaseStreamer
from transformers.models.internvl.configuration_internvl import InternVLConfig, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

VISION = {  # MODEL_SPEC §1.2, with the text width the projector maps into (1B: 896, 38B: 5120)
    "300m": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  norm_type="layer_norm", attention_bias=True, use_qk_norm=False), 896),
    "6b": (dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                norm_type="rms_norm", attention_bias=False, use_qk_norm=True), 5120),
}


DEVICE = "cuda"


def pixel_shuffle(x, scale=0.5):
    """InternVLModel.pixel_shuffle, as transformers 5.17 writes it (reshape/permute only)."""
    b, w, h, c = x.size()
    x = x.view(b, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def cuda_time(fn, warmup=2, repeat=10):
    if DEVICE == "cpu":  # only to check this script without a GPU
        import time
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return {"median_ms": ms, "min_ms": ms, "runs": 1}
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    ms.sort()
    return {"median_ms": ms[len(ms) // 2], "min_ms": ms[0], "runs": len(ms)}


def vision(shape, tiles, attn):
    kw, text_hidden = VISION[shape]
    vc = InternVLVisionConfig(image_size=[448, 448], patch_size=[14, 14], layer_norm_eps=1e-6, hidden_act="gelu",
                              use_mean_pooling=True, **kw)
    vc._attn_implementation = attn
    cfg = InternVLConfig(vision_config=vc.to_dict(), text_config={"model_type": "qwen2", "hidden_size": text_hidden},
                         downsample_ratio=0.5, projector_hidden_act="gelu")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        tower = InternVLVisionModel(vc).eval()
        projector = InternVLMultiModalProjector(cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = []
    for n in tiles:
        px = torch.randn(n, 3, 448, 448, device=DEVICE, dtype=torch.bfloat16)

        @torch.no_grad()
        def run():
            h = tower(pixel_values=px).last_hidden_state[:, 1:, :]
            side = int(h.shape[1] ** 0.5)
            h = h.reshape(h.shape[0], side, side, -1)
            h = pixel_shuffle(h)
            h = h.reshape(h.shape[0], -1, h.shape[-1])
            return projector(h)

        t = cuda_time(run)
        out.append({"shape": shape, "tiles": n, "attn": attn, "time": t, "ms": t["median_ms"]})
    del tower, projector
    torch.cuda.empty_cache()
    return out


TEXT = {  # MODEL_SPEC §1.1: the LLM of FaceLLM-1B and -8B
    "1b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864, vision="300m"),
    "8b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vision="300m"),
}
IMAGE_TOKEN = 151667


def bench_ids(n):
    """Same ids as facellm's bench (src/cli/bench.rs)."""
    return [1000 + (i * 7919) % 100_000 for i in range(n)]


def llm(size, batches, decode_tokens, compile_batches, attn):
    """TTFT of one 448 tile + 41 text tokens through the whole InternVL model, and greedy decode throughput
    at each batch size (text prompt of 41 tokens, `decode_tokens` new tokens, EOS ignored)."""
    from transformers import InternVLForConditionalGeneration
    t = dict(TEXT[size])
    vkw, _ = VISION[t.pop("vision")]
    vc = dict(image_size=[448, 448], patch_size=[14, 14], layer_norm_eps=1e-6, hidden_act="gelu",
              use_mean_pooling=True, model_type="internvl_vision", **vkw)
    tc = dict(model_type="qwen2", vocab_size=151674, hidden_act="silu", max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, bos_token_id=151643,
              eos_token_id=151645, **t)
    cfg = InternVLConfig(vision_config=vc, text_config=tc, downsample_ratio=0.5, projector_hidden_act="gelu",
                         image_token_id=IMAGE_TOKEN, image_seq_length=256)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = InternVLForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = {"shape": size, "attn": attn}
    ids = torch.tensor([[151644] + [IMAGE_TOKEN] * 256 + bench_ids(40)], device=DEVICE)
    px = torch.randn(1, 3, 448, 448, device=DEVICE, dtype=torch.bfloat16)

    @torch.no_grad()
    def ttft():
        logits = model(input_ids=ids, pixel_values=px, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1)

    out["ttft"] = cuda_time(ttft, warmup=2, repeat=10)
    print(json.dumps({"shape": size, "ttft": out["ttft"]}), file=sys.stderr, flush=True)
    decode = []
    for b in batches:
        prompt = torch.tensor([bench_ids(41)] * b, device=DEVICE)
        for mode in ["eager"] + (["static+compile"] if b in compile_batches else []):
            kw = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
            if mode != "eager":
                # A static cache makes transformers compile the forward itself on CUDA (generate's
                # auto-compile: torch.compile, mode reduce-overhead = CUDA graphs); the first calls compile.
                kw.update(cache_implementation="static")

            # Per-step time from the host timestamps of each generated token (a streamer's `put`, which generate
            # calls after every step once the token is on the host): one generate call, one compiled shape.
            class Stamps(BaseStreamer):
                def __init__(self):
                    self.t = []

                def put(self, value):
                    self.t.append(time.perf_counter())

                def end(self):
                    pass

            @torch.no_grad()
            def gen(streamer):
                return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), streamer=streamer, **kw)

            gen(None)  # warm-up (compiles, for the static cache)
            steps = []
            for _ in range(2):
                st = Stamps()
                gen(st)
                # put() #0 is the prompt, #1 the first token (prefill); later gaps are decode steps.
                steps += [b - a for a, b in zip(st.t[1:], st.t[2:])]
            steps.sort()
            per_step = steps[len(steps) // 2] * 1e3
            decode.append({"batch": b, "mode": mode, "ms_per_step": per_step,
                           "tokens_per_s": b * 1e3 / per_step})
            # Partial results as they come, so a run cut short by its time limit still reports them.
            print(json.dumps({"shape": size, **decode[-1]}), file=sys.stderr, flush=True)
    out["decode"] = decode
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else None
    del model
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vision", default="300m")
    ap.add_argument("--tiles", default="1,7,13")
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--device", default="cuda", help="cpu only checks that the script runs")
    ap.add_argument("--llm", default="", help="language-model shapes to time: 1b,8b")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--compile-batch", default="", help="batch sizes also timed with static cache + torch.compile")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    tiles = [int(t) for t in a.tiles.split(",")]
    report = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (cpu)", "torch": torch.__version__}
    import transformers
    report["transformers"] = transformers.__version__
    if a.vision:
        report["vision"] = [r for s in a.vision.split(",") for attn in a.attn.split(",") for r in vision(s, tiles, attn)]
    if a.llm:
        batches = [int(b) for b in a.batch.split(",")]
        compiled = [int(b) for b in a.compile_batch.split(",") if b]
        report["llm"] = [llm(s, batches, a.decode_tokens, compiled, "sdpa") for s in a.llm.split(",")]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
