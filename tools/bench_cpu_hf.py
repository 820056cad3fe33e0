"""HF transformers' side of the CPU benchmark: the same measurements as `facellm bench` (vision tower of a
published shape with random weights; prefill at the same prompt lengths and ids; greedy decode steps after
the first prompt), float32, eager attention, the same thread count. Prints JSON.

Run both in one session, with nothing else busy, e.g. on 2 threads:
    tools/.venv/bin/python tools/bench_cpu_hf.py --vision 300m --model tools/.cache/qwen2.5-coder-0.5b-instruct --threads 2
    target/release/facellm bench       --vision 300m --model tools/.cache/qwen2.5-coder-0.5b-instruct --threads 2
"""
import argparse
import json
import platform
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLVisionModel

VISION = {  # MODEL_SPEC §1.2
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
    "6b": dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
               norm_type="rms_norm", attention_bias=False, use_qk_norm=True),
}


def bench_ids(n):
    """Same ids as facellm's bench (src/cli/bench.rs)."""
    return [1000 + (i * 7919) % 100_000 for i in range(n)]


def stats(ms):
    ms = sorted(ms)
    return {"min_ms": ms[0], "median_ms": ms[len(ms) // 2], "all_ms": ms}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--vision", choices=sorted(VISION))
    ap.add_argument("--tiles", type=int, default=1)
    ap.add_argument("--prompt-tokens", default="40,512")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    report = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": a.threads,
              "torch": torch.__version__, "dtype": "float32", "attn": "eager"}
    with torch.inference_mode():
        if a.vision:
            cfg = InternVLVisionConfig(image_size=[448, 448], patch_size=[14, 14], layer_norm_eps=1e-6,
                                       hidden_act="gelu", use_mean_pooling=True, **VISION[a.vision])
            cfg._attn_implementation = "eager"
            model = InternVLVisionModel(cfg).eval().float()
            px = torch.randn(a.tiles, 3, 448, 448)
            model(pixel_values=px)
            ms = [timed(lambda: model(pixel_values=px))[1] for _ in range(a.repeat)]
            report["vision"] = {"shape": a.vision, "tiles": a.tiles, "time": stats(ms), "ms_per_tile": min(ms) / a.tiles}
            del model
        if a.model:
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
            load_ms = (time.perf_counter() - t) * 1e3
            prefill = []
            lens = [int(x) for x in a.prompt_tokens.split(",")]
            for n in lens:
                ids = torch.tensor([bench_ids(n)])
                ms = [timed(lambda: model(input_ids=ids, use_cache=True))[1] for _ in range(a.repeat)]
                prefill.append({"tokens": n, "time": stats(ms), "tokens_per_s": n * 1e3 / min(ms)})
            out = model(input_ids=torch.tensor([bench_ids(lens[0])]), use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
            ms = []
            for _ in range(a.decode_tokens):
                out, dt = timed(lambda: model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True))
                past, nxt = out.past_key_values, out.logits[0, -1].argmax()
                ms.append(dt)
            report["llm"] = {"model": a.model, "load_ms": load_ms, "prefill": prefill,
                             "decode": {"after_prompt_tokens": lens[0], "steps": len(ms), "time": stats(ms),
                                        "tokens_per_s": len(ms) * 1e3 / sum(ms)}}
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
