"""Summarises one tools/gpu_check.sh run as Markdown: facellm's and HF's timings side by side (same card,
same run), with the ratio, and the kernel table against the measured copy bandwidth.

    python3 tools/gpu_summary.py /tmp/facellm-gpu-check
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"({os.path.basename(path)}: {e})")
        return None


def main(out):
    fv = load(os.path.join(out, "bench_facellm_vision.json"))
    hv = load(os.path.join(out, "bench_hf_vision.json"))
    if fv:
        print(f"card: {fv.get('gpu')} (sm {fv.get('compute_capability')}), copy bandwidth "
              f"{fv.get('copy_bandwidth_gb_per_s', 0):.0f} GB/s\n")
    if fv and "vision" in fv:
        hf = {}
        for r in (hv or {}).get("vision", []):
            hf[(r["shape"], r["tiles"], r["attn"])] = r["ms"]
        print("| vision + projector | tiles | facellm ms | TFLOP/s | HF eager ms | HF sdpa ms | vs eager | vs sdpa |")
        print("|---|---|---|---|---|---|---|---|")
        for r in fv["vision"]:
            e, s = hf.get((r["shape"], r["tiles"], "eager")), hf.get((r["shape"], r["tiles"], "sdpa"))
            ratio = lambda h: f"{h / r['ms']:.2f}x" if h else "-"
            fmt = lambda h: f"{h:.2f}" if h else "-"
            print(f"| {r['shape']} | {r['tiles']} | {r['ms']:.2f} | {r['tflop_per_s']:.0f} | {fmt(e)} | {fmt(s)} "
                  f"| {ratio(e)} | {ratio(s)} |")
        print()
    if fv and "kernels" in fv:
        print("| kernel | case | us | GB/s | of copy bw | TFLOP/s |")
        print("|---|---|---|---|---|---|")
        for k in fv["kernels"]:
            print(f"| {k['op']} | {k['shape']} | {k['us']:.1f} | {k['gb_per_s']:.0f} | "
                  f"{100 * k['fraction_of_copy_bw']:.0f}% | {k['tflop_per_s']:.0f} |")
        print()
    fl = load(os.path.join(out, "bench_facellm_llm.json"))
    hl = load(os.path.join(out, "bench_hf_llm.json"))
    if fl and "llm" in fl:
        bw = fl.get("copy_bandwidth_gb_per_s") or 0
        hf = {r["shape"]: r for r in (hl or {}).get("llm", [])}
        print("| LLM shape | weights GB | floor ms/step (weights / copy bw) | TTFT ms (HF) | prefill 512 tok/s |")
        print("|---|---|---|---|---|")
        for r in fl["llm"]:
            h = hf.get(r["shape"], {})
            floor = r["weights_gb"] / bw * 1e3 if bw else float("nan")
            hf_ttft = h.get("ttft", {}).get("median_ms")
            print(f"| {r['shape']} | {r['weights_gb']:.2f} | {floor:.2f} | {r['ttft_ms']['median']:.2f} "
                  f"({hf_ttft:.1f}) | {r['prefill_512']['tokens_per_s']:.0f} |" if hf_ttft else
                  f"| {r['shape']} | {r['weights_gb']:.2f} | {floor:.2f} | {r['ttft_ms']['median']:.2f} (-) "
                  f"| {r['prefill_512']['tokens_per_s']:.0f} |")
        print()
        print("| LLM shape | batch | facellm tok/s | ms/step | HF eager tok/s | HF static+compile tok/s |")
        print("|---|---|---|---|---|---|")
        for r in fl["llm"]:
            h = hf.get(r["shape"], {})
            for d in r["decode"]:
                e = [x for x in h.get("decode", []) if x["batch"] == d["batch"] and x["mode"] == "eager"]
                c = [x for x in h.get("decode", []) if x["batch"] == d["batch"] and x["mode"] != "eager"]
                fmt = lambda xs: f"{xs[0]['tokens_per_s']:.0f}" if xs else "-"
                print(f"| {r['shape']} | {d['batch']} | {d['tokens_per_s']:.0f} | {d['ms_per_step']:.3f} | {fmt(e)} | {fmt(c)} |")
        print()
        if hl:
            extra = [(r["shape"], x) for r in hl.get("llm", []) for x in r.get("decode", [])
                     if x["batch"] not in {d["batch"] for f in fl["llm"] for d in f["decode"]}]
            for shape, x in extra:
                print(f"HF only: {shape} batch {x['batch']} {x['mode']}: {x['tokens_per_s']:.0f} tok/s")
    fg = load(os.path.join(out, "bench_facellm_llm_gemv.json"))
    if fl and fg and "llm" in fg:
        raw = {(r["shape"], d["batch"]): d for r in fl.get("llm", []) for d in r["decode"]}
        print()
        print("| decode, FACELLM_GEMV=1 (kernels/gemv.cu) | batch | tok/s | ms/step | cuBLASLt tok/s (same run) |")
        print("|---|---|---|---|---|")
        for r in fg["llm"]:
            for d in r["decode"]:
                base = raw.get((r["shape"], d["batch"]))
                print(f"| {r['shape']} | {d['batch']} | {d['tokens_per_s']:.0f} | {d['ms_per_step']:.3f} | "
                      + (f"{base['tokens_per_s']:.0f} |" if base else "- |"))
    if fl and "engine" in fl:
        raw = {(r["shape"], d["batch"]): d for r in fl.get("llm", []) for d in r["decode"]}
        print()
        print("| server engine (serve --device cuda) | batch | TTFT ms (median) | decode tok/s | ms/step | raw decode tok/s |")
        print("|---|---|---|---|---|---|")
        for r in fl["engine"]:
            for x in r["runs"]:
                d = raw.get((r["shape"], x["batch"]))
                print(f"| {r['shape']} | {x['batch']} | {x['ttft_ms_median']:.1f} | {x['decode_tokens_per_s']:.0f} | "
                      f"{x['decode_ms_per_step']:.3f} | {d['tokens_per_s']:.0f} |" if d else
                      f"| {r['shape']} | {x['batch']} | {x['ttft_ms_median']:.1f} | {x['decode_tokens_per_s']:.0f} | "
                      f"{x['decode_ms_per_step']:.3f} | - |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/facellm-gpu-check")
